"""Offline task converters against hand-checked records of the raw files in the data directory.

Expected values below were read off the raw files by hand (first lines of each file and its labels
file), not produced by the converters. The last tests check that our YAML tasks give exactly the
prompts, choices and targets of lm-eval's own task configs on the same records.
"""

from __future__ import annotations

import pytest

from losa.errors import LosaError
from losa.eval import converters as cv


@pytest.fixture(scope="module")
def records(data_dir):
    return {t: cv.load_task_records(t, data_dir) for t in cv.TASK_SOURCES}


def test_record_counts_match_readme(records):
    # counts stated in shared/data/README.md
    assert {t: len(r) for t, r in records.items()} == {
        "boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
        "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838}


def test_piqa_labels_come_from_lst(records):
    r = records["piqa"]
    # valid.jsonl line 1 + valid-labels.lst line 1 ("0"); line 2 + label "1"
    assert r[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?"
    assert r[0]["sol1"].endswith("made of ripped paper strips, you will also need to supply it with a water "
                                 "bottle and a food dish.")
    assert r[0]["label"] == 0
    assert r[1] == {"goal": "dresser", "sol1": "replace drawer with bobby pin ",
                    "sol2": "finish, woodgrain with  bobby pin ", "label": 1}
    assert sum(x["label"] for x in r) == 928  # the .lst holds 928 ones and 910 zeros


def test_winogrande(records):
    r = records["winogrande"]
    assert r[0] == {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                    "option1": "Sarah", "option2": "Maria", "answer": "2"}
    assert r[1]["answer"] == "1" and r[1]["sentence"].endswith("always got the harder cases.")


def test_winogrande_labels_file_is_authoritative_and_checked(tmp_path):
    items = tmp_path / "dev.jsonl"
    labels = tmp_path / "dev-labels.lst"
    items.write_text('{"sentence": "A _ b.", "option1": "x", "option2": "y"}\n')
    labels.write_text("2\n")
    assert cv.convert_winogrande(items, labels)[0]["answer"] == "2"
    items.write_text('{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}\n')
    with pytest.raises(LosaError, match="disagrees"):
        cv.convert_winogrande(items, labels)
    labels.write_text("1\n1\n")
    with pytest.raises(LosaError, match="2 labels but .* 1 items"):
        cv.convert_winogrande(items, labels)


def test_arc(records):
    e = records["arc_easy"][0]
    assert e["id"] == "Mercury_417466" and e["answerKey"] == "A"
    assert e["question"] == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert e["choices"]["label"] == ["A", "B", "C", "D"]
    assert e["choices"]["text"][0] == "Sunlight is the source of energy for nearly all ecosystems."
    # line 152 of ARC-Easy-Test.jsonl uses numeric labels
    n = records["arc_easy"][151]
    assert n["id"] == "NYSEDREGENTS_2013_8_12"
    assert n["choices"] == {"text": ["genes", "chlorophyll", "sperm", "eggs"], "label": ["1", "2", "3", "4"]}
    assert n["answerKey"] == "1"
    c = records["arc_challenge"][0]
    assert c["question"].startswith("An astronomer observes that a planet rotates faster after a meteorite impact.")
    assert c["choices"]["text"][c["choices"]["label"].index(c["answerKey"])] == "Planetary days will become shorter."


def test_boolq_true_false_to_int(records):
    r = records["boolq"]
    assert r[0]["question"] == "does ethanol take more energy make that produces"
    assert r[0]["passage"].startswith("Ethanol fuel -- All biomass goes through")
    assert r[0]["label"] == 0  # "label": false
    assert r[2]["question"] == "is pain experienced in a missing body part or paralyzed area"
    assert r[2]["label"] == 1  # "label": true
    assert sum(x["label"] for x in r) == 2033


def test_rte_string_labels_to_glue_ints(records):
    r = records["rte"]
    assert r[0]["sentence1"].startswith("Dana Reeve, the widow of the actor Christopher Reeve")
    assert r[0]["sentence2"] == "Christopher Reeve had an accident."
    assert r[0]["label"] == 1  # not_entailment -> 1 as in GLUE
    assert sum(1 for x in r if x["label"] == 0) == 146  # 146 "entailment" lines


def test_openbookqa_tsv(records):
    r = records["openbookqa"]
    assert r[0]["id"] == "8-343" and r[0]["answerKey"] == "B"
    assert r[0]["choices"] == {"text": ["make more phone calls", "quit eating lunch out",
                                        "buy less with monopoly money", "have lunch with friends"],
                               "label": ["A", "B", "C", "D"]}
    assert r[0]["question_stem"].endswith("they decide the best way to save money is to")
    assert r[1] == {"id": "1129", "question_stem": "There is most likely going to be fog around:",
                    "choices": {"text": ["a marsh", "a tundra", "the plains", "a desert"],
                                "label": ["A", "B", "C", "D"]}, "answerKey": "A"}


def test_obqa_choice_parser_rejects_garbage():
    assert cv.parse_obqa_choices("(A) x y (B) (z) (C) w (D) v") == (["x y", "(z)", "w", "v"], ["A", "B", "C", "D"])
    with pytest.raises(ValueError):
        cv.parse_obqa_choices("(A) x (C) y (B) z (D) w")
    with pytest.raises(ValueError):
        cv.parse_obqa_choices("no choices here")


def test_hellaswag_six_line_items(records):
    r = records["hellaswag"]
    # Rowan/hellaswag validation[0]: ctx_a "A man is sitting on a roof.", ctx_b "he", label 3
    assert r[0] == {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                    "ctx": "A man is sitting on a roof. he",
                    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                    "label": "3"}
    assert r[1]["ctx_a"] == "A lady walks to a barbell. She bends down and grabs the pole."
    assert r[1]["ctx_b"] == "the lady" and r[1]["label"] == "3"
    # item 5000 (lines 29995-30000) is a WikiHow item: the context ends with a full sentence
    w = r[4999]
    assert w["activity_label"] == "Health" and w["ctx_b"] == "" and w["label"] == "0"
    assert w["ctx_a"].endswith("Basil works against depression, fatigue and anxiety.")
    assert w["endings"][0].startswith("Rose essential oil has properties")


@pytest.mark.parametrize("ctx,expected", [
    ("A man is sitting on a roof. he", ("A man is sitting on a roof.", "he")),
    ("Two kids play. One falls! the other", ("Two kids play. One falls!", "the other")),
    ("a man is seen speaking to the camera", ("", "a man is seen speaking to the camera")),
    ("How to cook rice. Rinse the rice.", ("How to cook rice. Rinse the rice.", "")),
    ("The man holds a 3.5 m pole. The man", ("The man holds a 3.5 m pole. The man", "")),
])
def test_split_hellaswag_context(ctx, expected):
    assert cv.split_hellaswag_context(ctx) == expected


def test_missing_file_names_file_and_directory(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
    with pytest.raises(LosaError) as e:
        cv.load_task_records("piqa", tmp_path)
    msg = str(e.value)
    assert "piqa/valid-labels.lst" in msg and str(tmp_path) in msg and "\n" not in msg


def test_unknown_task_and_missing_dir(tmp_path, monkeypatch):
    with pytest.raises(LosaError, match="no offline data for task 'mmlu'"):
        cv.task_files("mmlu", tmp_path)
    with pytest.raises(LosaError, match="does not exist"):
        cv.resolve_data_dir(tmp_path / "nope")
    monkeypatch.delenv("LOSA_DATA_DIR", raising=False)
    with pytest.raises(LosaError, match="LOSA_DATA_DIR"):
        cv.resolve_data_dir(None)


# --- parity with lm-eval's own task configs --------------------------------------------------------

@pytest.fixture(scope="module")
def task_pairs(data_dir):
    """(lm-eval's built-in task fed with our records, our offline task) for every task."""
    import datasets
    from lm_eval.tasks import TaskManager

    from losa.eval.tasks import TASKS_DIR

    ours = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    builtin = TaskManager()
    pairs = {}
    for task in cv.TASK_SOURCES:
        recs = cv.load_task_records(task, data_dir)[:40]
        # every split lm-eval's config names (train is used for its few-shot sampler) holds the records
        ds = datasets.DatasetDict({k: datasets.Dataset.from_list(recs) for k in ("train", "validation", "test")})
        # lm-eval's own YAML for ``task``, with only its dataset swapped for our records
        ref = builtin._factory.build(builtin._entry(task), overrides={"custom_dataset": lambda ds=ds, **_: ds},
                                     registry=builtin._index)
        pairs[task] = (ref, ours.load(task)["tasks"][task])
    return pairs


@pytest.mark.parametrize("task", list(cv.TASK_SOURCES))
def test_prompts_equal_lm_eval_builtin(task_pairs, task):
    ref, ours = task_pairs[task]
    assert ref.config.dataset_path is not None  # really lm-eval's own config (hub dataset path kept)
    assert ours.config.output_type == ref.config.output_type == "multiple_choice"
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in ref.config.metric_list]
    ref_docs, our_docs = list(ref.eval_docs), list(ours.eval_docs)[:40]
    assert len(ref_docs) == 40
    for a, b in zip(ref_docs, our_docs):
        assert ours.doc_to_text(b) == ref.doc_to_text(a)
        assert ours.doc_to_choice(b) == ref.doc_to_choice(a)
        assert ours.doc_to_target(b) == ref.doc_to_target(a)
