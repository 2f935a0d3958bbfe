"""R3's reward in ppo_rlhf.py (Kim & Seo 2024, arXiv:2402.03469): its regularisers and the mixing rule against values
worked out by hand here, mean-pooled relevance against one text at a time, and the columns that choose each prompt's
form. The exact behaviour on the toy world is test_r3_toy_world.py's."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, BertConfig, BertModel

import ppo_rlhf as ppo
from helpers import TOY


# --------------------------------------------------------------------------- the regularisers, by hand
@pytest.mark.parametrize("text, words", [
    ("the food was good", ["the", "food", "was", "good"]),
    ("It's great!!", ["It", "'", "s", "great", "!!"]),  # punctuation runs are words, as nltk.wordpunct_tokenize
    ("  a\n\nb  ", ["a", "b"]),
    ("", []),
    ("x2 -> y", ["x2", "->", "y"]),
])
def test_wordpunct_splits_words_and_punctuation_runs(text, words):
    assert ppo.wordpunct(text) == words


@pytest.mark.parametrize("words, li", [([], 0.0), (["a"], 0.01), (["a", "b", "c", "d"], 0.04), (["w"] * 250, 2.5)])
def test_length_incentive_counts_words_over_100(words, li):
    assert ppo.length_incentive(words) == pytest.approx(li, abs=1e-15)


@pytest.mark.parametrize("words, rp", [
    ([], 1.0),  # empty: no trigrams
    (["a", "b"], 1.0),  # fewer than three words: no trigrams
    (["a", "a", "a"], 1.0),  # one trigram, distinct
    (["a", "a", "a", "a"], 0.5),  # (a a a) twice: 1 distinct of 2
    (["a", "b", "a", "b", "a"], 2 / 3),  # (a b a), (b a b), (a b a): 2 of 3
    (["A", "a", "a", "a"], 1.0),  # case-sensitive: (A a a) and (a a a) differ
    (["how", "was", "it", "how", "was", "it"], 3 / 4),  # (how was it) twice among 4
    (["how", "was", "it", "how", "was", "it", "how"], 3 / 5),  # (how was it) and (was it how) twice among 5
])
def test_repetition_penalty_is_distinct_over_all_trigrams(words, rp):
    assert ppo.repetition_penalty(words) == pytest.approx(rp, abs=1e-15)


def test_r3_reward_mixing_rule():
    """Open-ended rows: r_x * LI * RP. Constrained rows: F(r_y) * RP, F(r) = r / 3.5 * (max_new_tokens / 100),
    with no LI, linear beyond [0, 3.5] and below 0."""
    relevance = torch.tensor([2.0, 3.5, 1.75, 0.0, 7.0, -0.7])
    open_ended = torch.tensor([True, False, False, True, False, True])
    li = torch.tensor([0.1, 0.3, 0.3, 0.0, 0.3, 0.02])
    rp = torch.tensor([0.5, 1.0, 2 / 3, 1.0, 1.0, 1.0])
    got = ppo.r3_reward(relevance, open_ended, li, rp, max_new_tokens=512)
    want = [2.0 * 0.1 * 0.5,  # 0.1
            5.12,  # a top Contriever score maps to the top of LI's range, 512 / 100
            0.5 * 5.12 * 2 / 3,  # half the range, times RP
            0.0,  # an empty answer: LI = 0
            10.24,  # unclamped: twice the range
            -0.7 * 0.02]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    # max_new_tokens sets F's top: 5 tokens -> 0.05
    torch.testing.assert_close(ppo.r3_reward(torch.tensor([3.5]), torch.tensor([False]), torch.tensor([0.04]),
                                             torch.tensor([1.0]), max_new_tokens=5), torch.tensor([0.05]))


# --------------------------------------------------------------------------- mean-pooled relevance
@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A random 2-layer BERT on the toy tokenizer, saved, with 8 positions so that truncation can be seen."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TOY / "model")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=8, type_vocab_size=1,
                        pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("encoder")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_at_a_time(encoder, tokenizer, text: str) -> torch.Tensor:
    """The mean of the last hidden state over the text's tokens, with no padding in sight; 0 for no tokens."""
    ids = tokenizer.convert_tokens_to_ids(text.split())
    if not ids:
        return torch.zeros(encoder.config.hidden_size)
    return encoder(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)


def test_mean_pooled_relevance_matches_one_text_at_a_time(encoder_dir):
    encoder, tokenizer = ppo.load_encoder(str(encoder_dir), torch.device("cpu"))
    texts = ["how was the food ?", "food", "", "the film was very good", "not bad"]  # 5, 1, 0, 5, 2 tokens
    with torch.no_grad():
        batched = ppo.mean_pooled(encoder, tokenizer, texts)
        for text, row in zip(texts, batched):
            torch.testing.assert_close(row, one_at_a_time(encoder, tokenizer, text), rtol=0, atol=2e-6)
    assert ppo.mean_pooled(encoder, tokenizer, ["", ""]).abs().max() == 0  # a batch of empty texts: no tokens at all


def test_long_texts_keep_their_end(encoder_dir):
    """Contriever's tokenizer truncates on the left: a text over the encoder's 8 positions is read as its last 8."""
    encoder, tokenizer = ppo.load_encoder(str(encoder_dir), torch.device("cpu"))
    words = "how was the food ? the food was very good not bad".split()  # 12
    with torch.no_grad():
        got = ppo.mean_pooled(encoder, tokenizer, [" ".join(words)])[0]
        torch.testing.assert_close(got, one_at_a_time(encoder, tokenizer, " ".join(words[-8:])), rtol=0, atol=2e-6)


@pytest.mark.parametrize("reward", ["r3", "relevance"])
def test_r3_scores_score_each_row_against_its_own_query(encoder_dir, reward):
    """Open-ended rows against the question, constrained rows against their reference answer (--reward r3); every
    row against its question with --reward relevance, whose score is that relevance alone."""
    encoder, tokenizer = ppo.load_encoder(str(encoder_dir), torch.device("cpu"))
    queries = [ppo.Query("how was the food ?", "", True), ppo.Query("was the film good ?", "the film was good", False),
               ppo.Query("was the film good ?", "the film was good", False)]
    responses = ["food food food food", "the film", ""]
    args = ppo.Args(reward=reward, max_new_tokens=5)
    got = ppo.r3_scores(encoder, tokenizer, queries, responses, args)
    with torch.no_grad():
        embed = lambda text: one_at_a_time(encoder, tokenizer, text)  # noqa: E731
        second = "the film was good" if reward == "r3" else "was the film good ?"
        against = ["how was the food ?", second, second]
        relevance = torch.stack([embed(q) @ embed(r) for q, r in zip(against, responses)])
    torch.testing.assert_close(got["relevance"], relevance, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["length_incentive"], torch.tensor([0.04, 0.02, 0.0]))
    torch.testing.assert_close(got["repetition"], torch.tensor([0.5, 1.0, 1.0]))
    if reward == "relevance":
        want = relevance
    else:  # r_x * 0.04 * 0.5; F(r_y) = r_y / 3.5 * 0.05 (RP 1); the empty answer's relevance is 0, so is F's
        want = torch.stack([relevance[0] * 0.04 * 0.5, relevance[1] / 3.5 * 0.05, torch.tensor(0.0)])
    torch.testing.assert_close(got["scores"], want, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- the columns that pick each prompt's form
ROWS = {"prompt": ["how was the food ?", "was the film good ?", "was the trip good ?"],
        "reference": ["", "the film was good", "the trip was great"],
        "kind": ["OPENENDED", "constrained", "Constrained"]}  # the authors' label, and ours in any case
MESSAGES = {"prompt": [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "how was it ?"},
                        {"role": "assistant", "content": "fine"}, {"role": "user", "content": "and the film ?"}]],
            "reference": [[{"role": "user", "content": "and the film ?"}, {"role": "assistant", "content": "great"}]],
            "kind": ["constrained"]}


def test_r3_queries_read_the_question_reference_and_type():
    args = ppo.Args(reward="r3", query_type_column="kind")
    assert ppo.r3_queries(Dataset.from_dict(ROWS), args, "train") == [
        ppo.Query("how was the food ?", "", True), ppo.Query("was the film good ?", "the film was good", False),
        ppo.Query("was the trip good ?", "the trip was great", False)]
    # conversations: the user turns' text, joined; a reference given as messages: its assistant turns
    assert ppo.r3_queries(Dataset.from_dict(MESSAGES), args, "train") == [
        ppo.Query("how was it ? and the film ?", "great", False)]
    # without --query_type_column every prompt is open-ended, and no reference is read
    assert [q.open_ended for q in ppo.r3_queries(Dataset.from_dict(ROWS), ppo.Args(reward="r3"), "train")] == [True] * 3
    assert ppo.r3_queries(Dataset.from_dict(ROWS), ppo.Args(), "train") == [None] * 3  # the reward model's runs


@pytest.mark.parametrize("change, match", [
    (dict(kind=["open", "constrained", "constrained"]), r"train row 0: 'kind' is 'open', not open_ended or constr"),
    (dict(reference=["", " ", "x"]), r"train row 1: a constrained prompt needs a reference answer in 'reference'"),
    (dict(reference=None), r"needs a column 'reference' in the train split \(columns: \['kind', 'prompt'\]\)"),
])
def test_bad_query_columns_raise(change, match):
    rows = {k: v for k, v in {**ROWS, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        ppo.r3_queries(Dataset.from_dict(rows), ppo.Args(reward="r3", query_type_column="kind"), "train")


def test_queries_stay_with_their_prompts_when_empty_prompts_are_skipped(tmp_path):
    """load_prompts skips an empty prompt; the rows R3 reads its queries from skip the same ones."""
    rows = [{"prompt": p, "reference": f"ref {i}", "kind": "constrained"}
            for i, p in enumerate(["how was the food ?", "", "was the film good ?", "", "was the trip good ?"])]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ppo.Args(reward="r3", query_type_column="kind", dataset_name=str(tmp_path / "data.jsonl"), eval_holdout=0)
    tokenizer = AutoTokenizer.from_pretrained(TOY / "model")
    prompts, _, train_rows, _ = ppo.load_prompts(args, tokenizer)
    queries = ppo.r3_queries(train_rows, args, "train")
    assert [tokenizer.decode(p) for p in prompts] == [q.text for q in queries] == [
        "how was the food ?", "was the film good ?", "was the trip good ?"]
    assert [q.reference for q in queries] == ["ref 0", "ref 2", "ref 4"]


def test_r3_has_no_reward_model_to_start_the_critic_from():
    with pytest.raises(ValueError, match="--reward r3 has no reward model to start the value model from"):
        ppo.Args(reward="r3", value_model_init="reward_model")
