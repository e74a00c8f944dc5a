"""``kdqat predict``: a prediction per input row, from a student, a packed export or an ONNX export.

    kdqat predict --model runs/x/onnx --input reviews.tsv [--output predictions.tsv]
    echo "a gripping , funny film" | kdqat predict --model runs/x/student
    echo "EU rejects German call" | kdqat predict --model runs/ner        # tags and entities per word
    kdqat predict --model runs/squad --input questions.jsonl              # question, context -> answer

Input: a TSV (tab-separated, header row; quotes kept as text, as GLUE writes them) or CSV file with a
header, a JSONL file (one object per line), or plain text lines (stdin, or ``--format lines``). The text
column is the task's (SST-2: ``sentence``; pairs: both of the task's columns; NER: ``tokens``, a list of
words in JSONL, else whitespace-separated words; QA: ``question`` and ``context``) or ``text``;
``--text-column`` and ``--pair-column`` name others. Output: TSV ``label, probability, text`` (``value,
text`` for regression; NER ``entities, tags, text``; QA ``answer, score, question``; JSONL adds the
structure: entity word spans and scores, answer character offsets) to stdout, or to ``--output`` (TSV,
CSV or JSONL by its extension; an existing file is never overwritten: it is written to a temporary name
and moved into place when every row is done).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from kdqat_dist.errors import ConfigError
from kdqat_dist.export.predict import Prediction, Predictor, format_probability
from kdqat_dist.export.predict_heads import AnswerPrediction, TokenPrediction

FORMATS = ("tsv", "csv", "jsonl", "lines")
_EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "lines"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="a prediction per input row, from a student folder, a packed export or an ONNX export",
        description="Label and probability per input row (value for regression tasks; tags and entities for "
        "token classification; the answer for question answering), batched in input order.",
        epilog="examples:\n  kdqat predict --model runs/x/onnx --input reviews.tsv --output predictions.jsonl\n"
        '  echo "a gripping , funny film" | kdqat predict --model runs/x\n'
        '  echo "EU rejects German call" | kdqat predict --model runs/ner\n'
        "  kdqat predict --model runs/squad --input questions.jsonl  # question and context columns",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="a `kdqat train` student/ (or run) folder, or a `kdqat export` folder"
    )
    p.add_argument("--input", default="-", help="a TSV, CSV or JSONL file, or - for stdin (default)")
    p.add_argument("--format", choices=FORMATS, default=None, help="input format (default: by extension; stdin: lines)")
    p.add_argument("--text-column", default=None, help="input column with the text (default: the task's, or text)")
    p.add_argument("--pair-column", default=None, help="input column with the second text of a pair task")
    p.add_argument("--output", default=None, help="write here (.tsv, .csv or .jsonl) instead of stdout")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per row (default: the run's max_seq_length)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's)")
    p.set_defaults(func=run)


def _input_format(path: str, given: str | None) -> str:
    if given:
        return given
    if path == "-":
        return "lines"
    fmt = _EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"--input: cannot tell the format of {path} from its name; pass --format ({', '.join(FORMATS)})"
        )
    return fmt


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--input: {p} does not exist or is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--input: {p} is not UTF-8 text (byte {exc.start})") from None


def read_rows(path: str, fmt: str) -> list[dict[str, str]]:
    """The input rows as dicts of column -> text (``lines``: column ``text``)."""
    text = _read_text(path)
    name = "stdin" if path == "-" else path
    if fmt == "lines":
        return [{"text": line} for line in text.splitlines() if line.strip()]
    if fmt == "jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--input: {name} line {i} is not JSON ({exc.msg})") from None
            if isinstance(obj, str):
                obj = {"text": obj}
            if not isinstance(obj, dict):
                raise ConfigError(f"--input: {name} line {i} is not a JSON object or string")
            rows.append({str(k): v for k, v in obj.items()})
        return rows
    lines = text.splitlines()
    if fmt == "tsv":  # GLUE TSVs keep quote characters as text
        table = [ln.split("\t") for ln in lines if ln.strip()]
    else:
        table = [r for r in csv.reader(io.StringIO(text)) if r]
    if not table:
        return []
    header, body = table[0], table[1:]
    if len(set(header)) != len(header):
        raise ConfigError(f"--input: {name} has duplicate column names in its header {header}")
    rows = []
    for i, r in enumerate(body, 2):
        if len(r) != len(header):
            raise ConfigError(f"--input: {name} line {i} has {len(r)} fields, the header {len(header)}")
        rows.append(dict(zip(header, r, strict=True)))
    return rows


def _column(rows: list[dict], wanted: str | None, defaults: tuple[str, ...], flag: str, name: str) -> str | None:
    columns = list(rows[0])
    if wanted is not None:
        if wanted not in columns:
            raise ConfigError(f"{flag}: {name} has no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for c in defaults:
        if c in columns:
            return c
    return None


def texts_of(rows: list[dict], args, predictor: Predictor) -> tuple[list, list[str] | None]:
    """The rows' texts (token models: a text or a list of words) and second texts (pairs; QA: contexts)."""
    name = "stdin" if args.input == "-" else args.input
    task_a, task_b = predictor.text_columns
    qa = predictor.head == "qa"
    defaults = (task_a,) if qa else tuple(dict.fromkeys((task_a, "text", "sentence")))
    col = _column(rows, args.text_column, defaults, "--text-column", name)
    if col is None:
        raise ConfigError(
            f"--input: {name} has no text column {' or '.join(map(repr, defaults[:2]))} "
            f"(columns: {', '.join(rows[0])}); pass --text-column"
        )
    pair = _column(rows, args.pair_column, (task_b,) if task_b else (), "--pair-column", name)
    if task_b and pair is None:
        what = "answers questions about a context" if qa else "is a sentence pair task"
        raise ConfigError(f"--input: the model's task {what} and {name} has no column {task_b!r}; pass --pair-column")

    def text(r: dict, c: str, i: int) -> str | list[str]:
        v = r.get(c)
        words = predictor.head == "token" and isinstance(v, list) and all(isinstance(x, str) for x in v)
        if not (isinstance(v, str) or words):
            raise ConfigError(f"--input: {name} row {i + 1}: {c!r} is not a text ({type(v).__name__})")
        return v

    a = [text(r, col, i) for i, r in enumerate(rows)]
    return a, None if pair is None else [text(r, pair, i) for i, r in enumerate(rows)]


def _out_format(path: str | None) -> str:
    if path is None:
        return "tsv"
    fmt = _EXTENSIONS.get(Path(path).suffix.lower())
    if fmt not in ("tsv", "csv", "jsonl"):
        raise ConfigError(f"--output: {path} must end in .tsv, .csv or .jsonl")
    return fmt


def _sequence_row(p: Prediction, t: str, regression: bool) -> tuple[list[str], dict]:
    if regression:
        return [f"{p.value:.6g}", t], {"value": p.value, "text": t}
    return [p.label, format_probability(p.probability), t], {
        "label": p.label,
        "probability": round(p.probability, 6),
        "text": t,
    }


def _token_row(p: TokenPrediction) -> tuple[list[str], dict]:
    """Cells ``entities`` (``text:TYPE`` joined by ``; ``, as entity texts hold spaces), ``tags``, ``text``."""
    ents = [
        {"type": e.type, "start": e.start, "end": e.end, "text": e.text, "score": round(e.score, 6)} for e in p.entities
    ]
    cells = ["; ".join(f"{e.text}:{e.type}" for e in p.entities), " ".join(p.tags), " ".join(p.words)]
    return cells, {"entities": ents, "tags": p.tags, "words": p.words, "cut": p.cut}


def _answer_row(p: AnswerPrediction, question: str) -> tuple[list[str], dict]:
    doc = {"answer": p.answer, "score": round(p.score, 6), "start": p.start, "end": p.end, "question": question}
    return [p.answer, f"{p.score:.4f}", question], doc


def format_rows(preds: list, texts: list, fmt: str, regression: bool) -> str:
    """The predictions as a TSV/CSV table with a header, or JSONL (one object per row)."""
    if preds and isinstance(preds[0], TokenPrediction):
        head, rows = ["entities", "tags", "text"], [_token_row(p) for p in preds]
    elif preds and isinstance(preds[0], AnswerPrediction):
        head, rows = ["answer", "score", "question"], [_answer_row(p, t) for p, t in zip(preds, texts, strict=True)]
    else:
        head = ["value", "text"] if regression else ["label", "probability", "text"]
        rows = [_sequence_row(p, t, regression) for p, t in zip(preds, texts, strict=True)]
    if fmt == "jsonl":
        return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for _, doc in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(head)
        w.writerows(cells for cells, _ in rows)
        return buf.getvalue()
    return "\n".join(["\t".join(head)] + ["\t".join(cells) for cells, _ in rows]) + "\n"


def run(args) -> int:
    out_fmt = _out_format(args.output)
    if args.output is not None and Path(args.output).exists():
        raise ConfigError(f"--output: {args.output} already exists; refusing to overwrite it")
    if args.max_length is not None and args.max_length < 2:
        raise ConfigError(f"--max-length: {args.max_length} must be >= 2")
    fmt = _input_format(args.input, args.format)
    predictor = Predictor(args.model, batch_size=args.batch_size, max_length=args.max_length, threads=args.threads)
    rows = read_rows(args.input, fmt)
    if not rows:
        raise ConfigError(f"--input: {'stdin' if args.input == '-' else args.input} has no rows to predict")
    texts, pairs = texts_of(rows, args, predictor)
    preds = predictor.predict(texts, pairs)
    text = format_rows(preds, texts, out_fmt, predictor.labels is None)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    if not out.parent.is_dir():
        raise ConfigError(f"--output: the folder {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        if out.exists():  # appeared while we predicted
            raise ConfigError(f"--output: {out} already exists; refusing to overwrite it")
        tmp.replace(out)
    except OSError as exc:  # a read-only folder, a full disk
        raise ConfigError(f"--output: cannot write {out} ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"[predict] {len(preds)} rows -> {out} ({predictor.kind} model {predictor.folder})", file=sys.stderr)
    return 0
