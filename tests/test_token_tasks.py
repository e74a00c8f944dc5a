"""Token classification: CoNLL/JSON loading, sub-word label alignment, entity F1, token-level KD, end to end."""

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForTokenClassification

from kdqat_dist.config import DataConfig, QuantConfig, load_config
from kdqat_dist.data.heads import get_head
from kdqat_dist.data.heads.token import IGNORE_INDEX, align_labels
from kdqat_dist.data.loaders import Collator, load_splits, tokenize_splits
from kdqat_dist.data.metrics_ner import entity_scores, entity_spans
from kdqat_dist.data.tasks import CONLL_TAGS, get_task
from kdqat_dist.distill.objective import DistillObjective
from kdqat_dist.errors import ConfigError, DataError
from kdqat_dist.models.attention import use_kdqat_attention
from kdqat_dist.models.encoders import load_tokenizer
from kdqat_dist.models.tiny import make_tiny_checkpoint
from kdqat_dist.quant.api import prepare

# words of the tiny model's vocabulary (demo words), and names it spells letter by letter
_WORDS = ["the", "film", "critics", "found", "it", "funny", "and", "at", "festival", "in"]
_NAMES = {"PER": ["anna", "bob"], "LOC": ["paris", "rome"], "ORG": ["acme"], "MISC": ["french"]}


def _sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(int(rng.integers(4, 9))):
            if rng.random() < 0.3:
                kind = str(rng.choice(list(_NAMES)))
                for j in range(int(rng.integers(1, 3))):
                    words.append(str(rng.choice(_NAMES[kind])))
                    tags.append(("B-" if j == 0 else "I-") + kind)
            else:
                words.append(str(rng.choice(_WORDS)))
                tags.append("O")
        out.append((words, tags))
    return out


def write_conll(path: Path, sents, docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for words, tags in sents:
        lines += [f"{w} NN I-NP {t}" for w, t in zip(words, tags, strict=True)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def conll_folder(root: Path, n_train: int = 64, n_dev: int = 24) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_conll(root / "train.txt", _sentences(n_train, 0))
    write_conll(root / "valid.txt", _sentences(n_dev, 1))
    return root


# --------------------------------------------------------------------------- entity F1


def test_chunks_follow_iob2_and_iob1_and_split_at_type_changes():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert entity_spans(["I-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]  # IOB1: I- opens
    assert entity_spans(["I-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]  # IOB1: B- splits
    assert entity_spans(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]  # type change mid-run
    assert entity_spans(["O", "I-MISC"]) == [("MISC", 1, 1)]  # runs to the end
    assert entity_spans(["O", "O"]) == []


def test_entity_scores_count_a_chunk_only_with_its_type_and_both_boundaries():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-MISC", "O"]]  # PER cut short, ORG mistyped, LOC right
    m = entity_scores(gold, pred)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # IOB1 gold vs IOB2 prediction of the same chunks: all correct
    m = entity_scores([["I-PER", "I-PER", "O", "I-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]])
    assert m["f1"] == 1.0
    # 2 gold, 3 predicted, 2 right: P 2/3, R 1, F1 0.8
    m = entity_scores([["B-PER", "O", "B-LOC", "O"]], [["B-PER", "B-ORG", "B-LOC", "O"]])
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert entity_scores([["O"]], [["O"]])["f1"] == 0.0  # no chunks at all: 0, not NaN


# --------------------------------------------------------------------------- alignment


def test_first_sub_token_is_labelled_and_the_rest_ignored():
    assert align_labels([None, 0, 1, 1, 1, 2, None], [5, 6, 7]) == [-100, 5, 6, -100, -100, 7, -100]


def test_tokenized_words_carry_labels_at_first_sub_tokens_only(tmp_path):
    tok = load_tokenizer("tiny-bert")
    task = get_task(DataConfig(task="conll2003"))
    folder = tmp_path / "c"
    folder.mkdir()
    write_conll(folder / "train.txt", [(["anna", "found", "paris"], ["B-PER", "O", "B-LOC"])])
    write_conll(folder / "valid.txt", [(["film"], ["O"])])
    raw = load_splits(DataConfig(task="ner", source=str(folder)), task)
    assert raw["train"][0] == {"tokens": ["anna", "found", "paris"], "tags": [1, 0, 5]}
    feats = tokenize_splits(raw, tok, 32, tmp_path / "cache", get_head(task))["train"]
    ids, labels = feats[0]["input_ids"], feats[0]["labels"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == ["[CLS]", "a", "##n", "##n", "##a", "found", "p", "##a", "##r", "##i", "##s", "[SEP]"]
    assert labels == [-100, 1, -100, -100, -100, 0, 5, -100, -100, -100, -100, -100]
    batch = Collator(tok, head=get_head(task))(
        [
            feats[0],
            {
                **feats[0],
                "input_ids": ids[:3],
                "labels": labels[:3],
                "attention_mask": [1] * 3,
                "token_type_ids": [0] * 3,
            },
        ]
    )
    assert batch["labels"].shape == batch["input_ids"].shape and "word_ids" not in batch
    assert batch["labels"][1].tolist() == [-100, 1, -100] + [IGNORE_INDEX] * 9  # padding ignored


# --------------------------------------------------------------------------- files


def test_json_csv_and_conll_files_give_the_same_rows(tmp_path):
    sents = _sentences(5, 3)
    task = get_task(DataConfig(task="conll2003"))
    conll = load_splits(
        DataConfig(
            task="conll2003",
            train_file=str(write_conll(tmp_path / "a.conll", sents)),
            dev_file=str(write_conll(tmp_path / "b.txt", sents, docstart=False)),
        ),
        task,
    )
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in sents))
    ids = [[CONLL_TAGS.index(x) for x in t] for _, t in sents]
    with open(tmp_path / "b.csv", "w", newline="") as f:  # tokens space-separated, tags a JSON list of ids
        w = csv.writer(f)
        w.writerow(["tokens", "tags"])
        w.writerows([" ".join(words), json.dumps(i)] for (words, _), i in zip(sents, ids, strict=True))
    table = load_splits(
        DataConfig(task="conll2003", train_file=str(tmp_path / "a.jsonl"), dev_file=str(tmp_path / "b.csv")), task
    )
    for split in ("train", "dev"):
        assert table[split][:] == conll[split][:]


def test_custom_token_tasks_take_their_tag_names(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"tokens": ["a", "b"], "tags": ["B-X", "O"]}) + "\n")
    cfg = DataConfig(
        task="custom_tokens",
        label_list=["O", "B-X", "I-X"],
        train_file=str(tmp_path / "t.jsonl"),
        dev_file=str(tmp_path / "t.jsonl"),
    )
    task = get_task(cfg)
    assert (task.head, task.num_labels, task.selection_metric) == ("token", 3, "f1")
    assert load_splits(cfg, task)["dev"][0] == {"tokens": ["a", "b"], "tags": [1, 0]}
    with pytest.raises(DataError, match="label_list"):
        get_task(DataConfig(task="custom_tokens"))


@pytest.mark.parametrize(
    "text, name, match",
    [
        ("anna NN B-PER\nfound\n", "t.txt", r"t\.txt:2: expected 'word \.\.\. tag'"),
        ("anna NN B-CITY\n", "t.txt", r"t\.txt:1: tag 'B-CITY' \(the line's last column\) is not in the tag set"),
        ("anna NNP\nfound VBD\n", "t.txt", r"t\.txt:1: tag 'NNP' \(the line's last column\) is not in the tag set"),
        ("", "t.txt", r"t\.txt: no sentences"),
        ("\n\n", "t.txt", "no sentences"),
        ("", "t.jsonl", r"t\.jsonl: the file has no rows; a JSONL table holds one JSON object per row"),
        ("[ ]", "t.json", r"t\.json: the file has no rows"),
        (
            '{"tokens": ["anna"]}\n',
            "t.jsonl",
            r"t\.jsonl: column 'tags' \(data\.label\) not found; columns present: tokens",
        ),
    ],
)
def test_bad_token_files_name_the_file_and_line(tmp_path, text, name, match):
    (tmp_path / name).write_text(text)
    cfg = DataConfig(task="conll2003", train_file=str(tmp_path / name), dev_file=str(tmp_path / name))
    with pytest.raises(DataError, match=match):
        load_splits(cfg, get_task(cfg))


def test_a_folder_without_a_training_file_is_one_line(tmp_path):
    with pytest.raises(DataError, match="no training file"):
        load_splits(DataConfig(task="conll2003", source=str(tmp_path)), get_task(DataConfig(task="conll2003")))


# --------------------------------------------------------------------------- token-level KD


def test_token_kd_and_ground_truth_equal_a_naive_masked_loop():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5
    )
    teacher = BertForTokenClassification(cfg).eval()
    teacher.classifier.weight.data.mul_(20)
    student = copy.deepcopy(teacher)
    prepare(student, QuantConfig())
    for m in (student, teacher):
        use_kdqat_attention(m)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, 4:] = 0, 0
    labels = torch.randint(0, 5, (3, 9), generator=g)
    labels[:, 0] = IGNORE_INDEX  # [CLS]
    labels[0, 3] = labels[1, 2] = IGNORE_INDEX  # later sub-tokens
    labels[mask == 0] = IGNORE_INDEX
    batch = {"input_ids": torch.randint(1, 60, (3, 9), generator=g), "attention_mask": mask, "labels": labels}
    head = get_head(get_task(DataConfig(task="conll2003")))
    from kdqat_dist.config import DistillConfig, build_section

    dcfg = build_section(
        DistillConfig,
        {
            "logits": {"weight": 1.0},
            "ground_truth": {"weight": 1.0},
            "hidden": {"weight": 0.0},
            "attn_score": {"weight": 0.0},
            "attn_map": {"weight": 0.0},
            "attn_output": {"weight": 0.0},
        },
        "distill",
    )
    obj = DistillObjective.for_models(dcfg, student, teacher, head=head.outputs)
    out = obj(student, teacher, batch)
    zs, zt = out.student_logits.detach(), out.teacher_logits
    kd, ce, n = 0.0, 0.0, 0
    for b in range(3):
        for s in range(9):
            if labels[b, s] == IGNORE_INDEX:
                continue
            p_t = torch.softmax(zt[b, s], -1)
            kd += float(-(p_t * torch.log_softmax(zs[b, s], -1)).sum())
            ce += float(-torch.log_softmax(zs[b, s], -1)[labels[b, s]])
            n += 1
    assert n == int((labels != IGNORE_INDEX).sum()) < int(mask.sum())
    assert float(out.terms["logits"].detach()) == pytest.approx(kd / n, rel=1e-5)
    assert float(out.terms["ground_truth"].detach()) == pytest.approx(ce / n, rel=1e-5)
    torch.testing.assert_close(out.total, obj.naive(student, teacher, batch).total)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def token_teacher(tmp_path_factory):
    from kdqat_dist.engine.loop import run

    root = tmp_path_factory.mktemp("tok")
    data = conll_folder(root / "conll")
    out = root / "teacher"
    cfg = load_config(
        "tiny_finetune",
        [
            f"train.output_dir={out}",
            "data.task=conll2003",
            f"data.source={data}",
            "train.max_steps=6",
            "train.eval_every=6",
            "train.batch_size=16",
        ],
    )
    result = run(cfg, "finetune")
    return out / "model", data, result


@pytest.fixture(scope="module")
def token_student(token_teacher, tmp_path_factory):
    """One KD-QAT run of a token student (4 steps, through the ``ner`` alias): its config, folder and result."""
    from kdqat_dist.engine.loop import run

    teacher, data, _ = token_teacher
    out = tmp_path_factory.mktemp("tok_run") / "student"  # analyze names a student after this folder
    cfg = load_config(
        "tiny_debug",
        [
            f"train.output_dir={out}",
            f"teacher.path={teacher}",
            "data.task=ner",
            f"data.source={data}",
            "train.max_steps=4",
            "train.eval_every=4",
        ],
    )
    return cfg, out, run(cfg, "train")


def test_finetune_train_and_eval_run_on_a_conll_folder(token_student):
    from kdqat_dist.pipeline import evaluate_folder
    from kdqat_dist.quant.student import load_student

    cfg, out, result = token_student
    assert {"f1", "precision", "recall", "accuracy", "selection"} <= set(result["best"])
    model = load_student(out / "student")
    assert type(model).__name__ == "BertForTokenClassification"
    metrics = evaluate_folder(cfg, str(out / "student"), table=False)
    assert metrics["f1"] == pytest.approx(result["best"]["f1"], abs=1e-9)


def test_export_round_trips_onnx_exports_analyze_and_predict_run(
    token_teacher, token_student, tmp_path, capsys, assert_finite_analysis
):
    from kdqat_dist.cli import main

    teacher = token_teacher[0]
    out = token_student[1]
    assert main(["export", "--student", str(out / "student"), "--out", str(tmp_path / "packed")]) == 0
    assert "round trip OK" in capsys.readouterr().out
    # ONNX: the tag logits [batch, sequence, tags], checked against the student over the dev set's tokens
    assert main(["export", "--format", "onnx", "--student", str(out / "student"), "--out", str(tmp_path / "o")]) == 0
    assert "predictions agree on" in capsys.readouterr().out
    meta = json.loads((tmp_path / "o" / "kdqat_onnx.json").read_text())
    assert meta["head"] == "token" and meta["round_trip"]["unit"] == "tokens" and meta["round_trip"]["rows"] > 24
    # `kdqat predict` tags the words of a row alike with the student and its ONNX export
    (tmp_path / "in.txt").write_text("anna found paris\nthe critics at acme found it funny\n")
    tables = []
    for model in (out / "student", tmp_path / "o"):
        assert main(["predict", "--model", str(model), "--input", str(tmp_path / "in.txt")]) == 0
        tables.append(capsys.readouterr().out.splitlines())
    assert tables[0] == tables[1] and tables[0][0] == "entities\ttags\ttext" and len(tables[0]) == 3
    # `kdqat analyze` runs on the token student: its Hessian loss is the head's CE over labelled sub-tokens
    an = tmp_path / "a"
    argv = ["analyze", "--teacher", str(teacher), "--student", str(out / "student"), "--out", str(an)]
    assert main([*argv, "--samples", "2", "--hessian-samples", "2", "--hessian-iters", "3", "--no-figures"]) == 0
    doc = json.loads((an / "analysis.json").read_text())
    assert doc["meta"]["task"] == "conll2003" and len(doc["lengths"]) == 2
    assert_finite_analysis(doc, "student")
    assert "| student |" in (an / "summary.md").read_text()


def test_analysis_hessian_loss_is_the_heads_masked_ce(tmp_path):
    """analyze's token examples carry [1, S] labels (first sub-tokens only); its Hessian loss is the head's
    CE over the labelled positions, which equals the model's own token-classification loss."""
    from kdqat_dist.analysis.hessian import hessian_loss
    from kdqat_dist.analysis.report import _tokenize

    data = conll_folder(tmp_path / "conll", n_train=4, n_dev=4)
    task = get_task(DataConfig(task="conll2003", source=str(data)))
    head = get_head(task)
    raw = load_splits(DataConfig(task="conll2003", source=str(data)), task)
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", num_labels=head.num_labels)
    tok = load_tokenizer(str(ckpt))
    examples = _tokenize(DataConfig(task="conll2003", source=str(data)), task, raw["dev"], tok, head)
    model = head.auto_class.from_pretrained(str(ckpt)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        model.classifier.weight.normal_()  # away from ~uniform logits, so a wrong mask changes the loss
    for ex in examples:
        labels = ex["labels"]
        assert labels.shape == ex["input_ids"].shape and (labels == IGNORE_INDEX).any() and (labels >= 0).any()
        with torch.no_grad():
            got = hessian_loss(model, ex, 0.0, head=head).item()
            assert got == pytest.approx(model(**ex).loss.item(), rel=1e-6)
            unmasked = torch.nn.functional.cross_entropy(model(ex["input_ids"]).logits[0], labels[0].clamp(min=0))
        assert got != pytest.approx(unmasked.item(), rel=1e-3)


def test_hessian_skips_token_examples_without_a_labelled_sub_token():
    """A token example whose labels are all -100 (here [CLS] [SEP]) has no CE rows: its loss is 0, not NaN,
    and the spectrum leaves it out instead of reporting the norm term's eigenvalue as the data's."""
    from kdqat_dist.analysis.hessian import has_labelled_rows, hessian_loss, max_eigenvalue_spectrum

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    model = BertForTokenClassification(cfg).eval()
    use_kdqat_attention(model)  # SDPA on CPU has no double backward
    head = get_head(get_task(DataConfig(task="custom_tokens", label_list=["O", "B-X", "I-X"])))
    empty = {"input_ids": torch.tensor([[2, 3]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    empty["labels"] = torch.full((1, 2), IGNORE_INDEX)
    words = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    words["labels"] = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX]])
    assert not has_labelled_rows(empty, head) and has_labelled_rows(words, head) and has_labelled_rows(empty, None)
    loss = hessian_loss(model, empty, 0.0, head=head)
    assert loss.item() == 0.0 and loss.requires_grad  # was NaN: a mean over zero positions
    assert torch.isfinite(hessian_loss(model, empty, 0.01, head=head))
    both = max_eigenvalue_spectrum(model, [empty, words], max_iter=5, norm_weight=0.0, head=head)
    alone = max_eigenvalue_spectrum(model, [words], max_iter=5, norm_weight=0.0, head=head)
    assert both["eigenvalues"].shape == (1, 1) and np.isfinite(both["eigenvalues"]).all()
    np.testing.assert_array_equal(both["eigenvalues"], alone["eigenvalues"])


def test_sweeps_accept_the_token_tasks(tmp_path):
    from kdqat_dist.tune.spec import parse_spec

    search = {"task": "grid[conll2003, ner, sst2]", "train.seed": "grid[42]"}
    spec = parse_spec({"base": "tiny_debug", "teacher_path": "models/{task}", "search": search}, cwd=tmp_path)
    assert spec.num_grid_points == 3
    with pytest.raises(ConfigError, match="unknown task .conll."):
        parse_spec({"base": "tiny_debug", "search": {"task": "grid[conll]"}}, cwd=tmp_path)
