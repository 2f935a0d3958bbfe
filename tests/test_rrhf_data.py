"""rrhf.py's data: ranked and pairwise formats, counted skips and named errors, and the batched log-probs of groups of
different k. (Its training loop is tested with the other offline scripts', in test_offline_machinery.py; helpers it
shares with dpo.py are byte-identical copies, tested in test_dpo_machinery.py.)"""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import rrhf
from helpers import TOY


def ranked_row(completions, scores, prompt="how was the food ?"):
    return {"prompt": [{"role": "user", "content": prompt}],
            "completions": [[{"role": "assistant", "content": c}] for c in completions], "scores": scores}


def tokenize(rows, tokenizer, kind="ranked", **kwargs):
    return rrhf.tokenize_groups(Dataset.from_list(rows), tokenizer, 512, 256, "train", kind, "completions", "scores",
                                **kwargs)


def test_bad_rows_are_counted_and_reported(toy_tokenizer, capsys):
    rows = [ranked_row(["great food", "awful"], [4.0, 1.0]),
            ranked_row(["great food", "awful", "the"], [4.0, 1.0]),  # 3 responses, 2 scores
            ranked_row(["great food", "awful"], [2.0, 2.0]),  # all tied
            ranked_row(["great food"], [4.0]),  # k = 1
            ranked_row(["great food", "awful", "the"], [4.0, 1.0, 1.0])]  # a tie below the top is fine
    kept = tokenize(rows, toy_tokenizer)
    out = capsys.readouterr().out
    assert [r["scores"] for r in kept] == [[4.0, 1.0], [4.0, 1.0, 1.0]]
    assert "train: 2 groups kept of 5 (k: 2 x1, 3 x1" in out
    assert ("responses and scores do not line up: 1" in out and "all scores tied: 1" in out
            and "fewer than 2 responses: 1" in out)


def test_a_group_shares_one_truncated_prompt(toy_tokenizer, capsys):
    """Issue 17, defect 5. The group's longest sequence, `<|user|> how was the food ? <|assistant|> great food party
    <|end|>`, has 11 tokens, over max_length 9: the group's prompt is cut once, to its last max_prompt_length = 4
    tokens, so " good" follows the same context as " great food party" (it used to keep all 7 prompt tokens, since
    its own sequence fits). A group that fits keeps its whole prompt."""
    row = ranked_row(["good", "great food party"], [1.0, 0.0])
    (group,) = rrhf.tokenize_groups(Dataset.from_list([row]), toy_tokenizer, 9, 4, "train", "ranked", "completions",
                                    "scores")
    context = ["the", "food", "?", "<|assistant|>"]
    assert [toy_tokenizer.convert_ids_to_tokens(s) for s in group["seqs"]] == [
        context + ["good", "<|end|>"], context + ["great", "food", "party", "<|end|>"]]
    assert group["starts"] == [4, 4]
    assert "1 groups truncated to 9 tokens" in capsys.readouterr().out
    (whole,) = rrhf.tokenize_groups(Dataset.from_list([row]), toy_tokenizer, 11, 4, "train", "ranked", "completions",
                                    "scores")
    assert whole["starts"] == [7, 7] and len(whole["seqs"][1]) == 11


def test_the_reward_model_scores_a_group_on_its_shared_prompt(toy_tokenizer):
    """The same group rescored by --reward_model_path: each response is read after the group's one truncated
    context, the context the policy is trained on (a stand-in reward model records what it is given)."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, read, input_ids, attention_mask):
            seen.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
            return torch.zeros(len(input_ids), 1)

    row = ranked_row(["good", "great food party"], [1.0, 0.0])
    runtime = rrhf.Runtime(rank=0, world=1, device=torch.device("cpu"), bf16=False)
    rrhf.reward_model_scores(Dataset.from_list([row]), Recorder(), toy_tokenizer, 9, 4, "train", "ranked",
                             "completions", 8, runtime)
    context = ["the", "food", "?", "<|assistant|>"]
    assert sorted(toy_tokenizer.convert_ids_to_tokens(s) for s in seen) == sorted(
        [context + ["good", "<|end|>"], context + ["great", "food", "party", "<|end|>"]])


@pytest.mark.parametrize("row, match", [
    (ranked_row(["great food", "awful"], ["4", "high"]),
     r"row 0: column 'scores' should be a list of finite numbers, got .\['4', 'high'\]."),
    (ranked_row(["great food", "awful"], [4.0, float("nan")]),
     "row 0: column 'scores' should be a list of finite numbers"),
    (ranked_row(["great food", "awful"], [4.0, 1.0]) | {"completions": "great food"},
     "row 0: column 'completions' should be a list of message lists"),
    (ranked_row(["great food", "awful"], [4.0, 1.0]) | {"prompt": "how was the food ?"},
     "row 0: column 'completions' should be a list of strings"),
])
def test_malformed_rows_stop_naming_row_and_column(toy_tokenizer, row, match):
    with pytest.raises(ValueError, match=match):
        tokenize([row], toy_tokenizer)


@pytest.mark.parametrize("columns, need_scores, match", [
    ({"prompt": ["x"], "completions": [["a", "b"]]}, True, "has a 'completions' column but no 'scores' column"),
    ({"completions": [["a", "b"]], "scores": [[1, 0]]}, True, "has a 'completions' column but no 'prompt' column"),
    ({"prompt": ["x"], "answers": [["a", "b"]]}, True, "neither a 'completions' column nor 'chosen' and 'rejected'"),
])
def test_unknown_layouts_name_the_missing_column(columns, need_scores, match):
    with pytest.raises(ValueError, match=match):
        rrhf.data_kind(Dataset.from_dict(columns), "mine", "completions", "scores", need_scores)
    assert rrhf.data_kind(Dataset.from_dict({"prompt": ["x"], "completions": [["a", "b"]]}), "mine", "completions",
                          "scores", False) == "ranked"


def test_pairwise_rows_are_groups_of_two(toy_tokenizer):
    """A conversational pair gives the same group as the ranked row (prompt, [chosen, rejected], [1, 0]): the two code
    paths (dpo.py's row_texts, and the ranked reader) tokenize alike. The plain-text and implicit-prompt pair formats
    keep every row as k = 2."""
    pairs = [json.loads(line) for line in (TOY / "pairs" / "train.jsonl").read_text().splitlines()[:32]]
    as_pairs = tokenize(pairs, toy_tokenizer, kind="pairwise")
    as_ranked = tokenize([{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "scores": [1.0, 0.0]}
                          for r in pairs], toy_tokenizer)
    assert as_pairs == as_ranked and len(as_pairs) == 32
    for name in ("pairs_standard", "pairs_implicit"):
        rows = [json.loads(line) for line in (TOY / name / "train.jsonl").read_text().splitlines()[:32]]
        groups = tokenize(rows, toy_tokenizer, kind="pairwise")
        assert len(groups) == 32 and all(g["scores"] == [1.0, 0.0] and len(g["seqs"]) == 2 for g in groups)


def test_batched_group_logps_match_one_sequence_at_a_time(toy_model_dir, toy_tokenizer):
    """Groups of k = 2, 4 and 3 in one batch: each (g, i) entry of group_logps is that response's summed log-prob and
    token count, computed here from a forward over the lone unpadded sequence; the padding slot is 0."""
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    rows = tokenize([ranked_row(["great food", "awful"], [4.0, 1.0]),
                     ranked_row(["the film was good", "", "very bad trip", "food"], [3.0, 2.0, 0.0, 2.5],
                                "how was the film ?"),
                     ranked_row(["not bad", "good party", "?"], [2.5, 1.0, 0.0], "was the party good ?")],
                    toy_tokenizer)
    batch = rrhf.collate_groups(rows, toy_tokenizer.pad_token_id)
    with torch.no_grad():
        logps, lengths = rrhf.group_logps(model, batch)
        for g, row in enumerate(rows):
            for i, (seq, start) in enumerate(zip(row["seqs"], row["starts"])):
                lp = model(input_ids=torch.tensor([seq])).logits[0].log_softmax(-1)
                want = sum(lp[t - 1, seq[t]] for t in range(start, len(seq)))
                assert logps[g, i].item() == pytest.approx(want.item(), abs=1e-4)
                assert lengths[g, i] == len(seq) - start
    assert batch["valid"].tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]
    assert logps[0, 2:].tolist() == [0.0, 0.0] and lengths[2, 3] == 0
