"""slic_hf.py's triples: the pair and its regularisation target y_ref condition on one context."""

import pytest
from datasets import Dataset

import slic_hf


def test_a_triple_shares_one_truncated_prompt(toy_tokenizer):
    """max_length 12, max_prompt_length 4: the pair (a 7-token prompt, answers of 2-3 tokens with <eos>) fits, the
    target (5 words + <eos>) does not. All three must then follow the prompt's last 4 tokens; the target used to be
    cut on its own while the pair kept all 7 (found by the issue-17 review of the tests, like RRHF's defect 5)."""
    prompt = "how was the food ? was the"
    data = Dataset.from_list([{"prompt": prompt, "chosen": " food good", "rejected": " bad",
                               "sft_target": " food was very very good"}])
    rows = slic_hf.tokenize_triples(data, toy_tokenizer, 12, 4, "train", "sft_target")
    ids = lambda text: toy_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [toy_tokenizer.eos_token_id]
    context = ids(prompt)[-4:]  # "? was the" preceded by "food": the last 4 prompt tokens, written out
    assert toy_tokenizer.convert_ids_to_tokens(context) == ["food", "?", "was", "the"]
    (row,) = rows
    assert row["chosen"] == context + ids(" food good") + eos and row["chosen_start"] == 4
    assert row["rejected"] == context + ids(" bad") + eos and row["rejected_start"] == 4
    assert row["target"] == context + ids(" food was very very good") + eos and row["target_start"] == 4


def test_a_triple_that_fits_keeps_its_whole_prompt(toy_tokenizer):
    data = Dataset.from_list([{"prompt": "how was the food ?", "chosen": " good", "rejected": " bad",
                               "sft_target": " very good"}])
    (row,) = slic_hf.tokenize_triples(data, toy_tokenizer, 12, 4, "train", "sft_target")
    assert row["chosen_start"] == row["rejected_start"] == row["target_start"] == 5


@pytest.mark.parametrize("split_with_target", ["train", "test"])
def test_a_target_column_in_one_split_only_is_refused(monkeypatch, toy_tokenizer, split_with_target, capsys):
    """y_ref must be the same kind in both splits: a target column in only one of them stops the run, naming it. (A
    local folder of JSON files cannot load so: a column only the eval file has fails in `datasets`, and one only the
    train file has reads as None in the eval split, which the format check refuses.)"""
    splits = []
    for split in ("train", "test"):
        row = {"prompt": "how was the food ?", "chosen": " good", "rejected": " bad"}
        splits.append(Dataset.from_list([row | ({"sft_target": " very good"} if split == split_with_target else {})]))
    monkeypatch.setattr(slic_hf, "load_splits", lambda *args: tuple(splits))
    with pytest.raises(slic_hf.UsageError, match="one split has a 'sft_target' column and the other does not"):
        slic_hf.load_triples(slic_hf.Args(), toy_tokenizer)
    desc = {"train": "train", "test": "eval"}  # the printed name of each split
    other = "test" if split_with_target == "train" else "train"
    out = capsys.readouterr().out
    assert f"{desc[other]}: y_ref is the chosen answer (no 'sft_target' column)" in out
    assert f"{desc[split_with_target]}: y_ref from column 'sft_target' in 1 pairs; 0 skipped" in out
