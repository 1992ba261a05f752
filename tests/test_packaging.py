"""Packaging: the optional extras behave as documented, and there is one version.

A plain `pip install smallcap` has neither PyAV, pycocoevalcap nor accelerate. Each test runs the real CLI in a
fresh interpreter where those modules cannot be imported (`sys.modules[name] = None` makes `import name`
fail exactly as for an uninstalled package) and checks what the user sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import COCO_MINI, REPO, run_cli

import smallcap
from smallcap.errors import MissingExtraError, SmallCapError, require_extra

OPTIONAL = ("av", "pycocoevalcap", "accelerate")
IMAGE = COCO_MINI / "val2017" / "000000000139.jpg"
VAL_CAPTIONS = COCO_MINI / "annotations" / "captions_val2017.json"

# Runs the CLI with the optional modules unimportable, then reports which of them got imported anyway.
_WITHOUT_EXTRAS = """
import json, sys
blocked = json.loads(sys.argv[1])
for name in blocked:
    sys.modules[name] = None
from smallcap.cli import main
code = main(sys.argv[2:])
print(json.dumps({"imported": [n for n in blocked if sys.modules.get(n) is not None]}))
sys.exit(code)
"""


def run_without_extras(*args: str, blocked: tuple[str, ...] = OPTIONAL) -> subprocess.CompletedProcess:
    """`smallcap ARGS` in a fresh interpreter in which the `blocked` modules cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, json.dumps(blocked), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, extra: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"pip install 'smallcap[{extra}]'" in lines[0], lines[0]


def test_require_extra_returns_the_module_or_names_the_extra():
    assert require_extra("json", "eval", "Reading JSON") is json
    with pytest.raises(MissingExtraError) as caught:
        require_extra("smallcap_no_such_module.sub", "video", "Reading video files")
    assert isinstance(caught.value, SmallCapError)
    assert str(caught.value).startswith("Reading video files needs the optional extra: pip install 'smallcap[video]'")
    assert caught.value.extra == "video"


def test_captioning_a_photo_needs_no_optional_extra(tmp_path):
    out = tmp_path / "captions.jsonl"
    result = run_without_extras("caption", IMAGE, "--model", "mini", "--datastore", "mini-target",
                                "--output", out)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"imported": []}
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["caption"].strip()


@pytest.mark.slow
def test_a_video_without_the_video_extra_is_one_message(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(64))  # an MP4 header
    result = run_without_extras("caption", clip, "--model", "mini", "--no-retrieval", blocked=("av",))
    assert_one_line_error(result, "video")


def test_evaluate_without_the_eval_extra_is_one_message(tmp_path):
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": 139, "caption": "a living room"}]))
    result = run_without_extras("evaluate", "--references", VAL_CAPTIONS, "--predictions", predictions,
                                blocked=("pycocoevalcap",))
    assert_one_line_error(result, "eval")


@pytest.mark.slow
def test_train_without_the_train_extra_is_one_message(tmp_path):
    result = run_without_extras("train", VAL_CAPTIONS, "--output-dir", tmp_path / "run", "--no-retrieval",
                                blocked=("accelerate",))
    assert_one_line_error(result, "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_one_version_everywhere():
    from importlib.metadata import version

    assert run_cli("--version").stdout.strip() == f"smallcap {smallcap.__version__}"
    assert version("smallcap") == smallcap.__version__  # pyproject reads it from smallcap.__version__


def test_the_readme_layout_lists_every_module():
    """The README's "Project layout" names every module of src/smallcap (a sub-package's modules indented under
    it, several to a line allowed) and no module that is not there."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Project layout", 1)[1].split("```", 2)[1].strip("\n").splitlines()
    assert block[0] == "src/smallcap/"
    listed, folders = set(), {}
    for line in block[1:]:
        depth = (len(line) - len(line.lstrip())) // 2
        if depth == 0:  # tests/ benchmarks/ scripts/: outside the package
            continue
        for name in line.split():
            if not name.endswith((".py", "/")):
                break  # the description
            path = "".join(folders[level] for level in range(1, depth)) + name
            if name.endswith("/"):
                folders[depth] = name
            else:
                listed.add(path)
    package = REPO / "src" / "smallcap"
    modules = {path.relative_to(package).as_posix() for path in package.rglob("*.py")
               if path.name != "__init__.py" or path.parent == package}
    assert sorted(modules - listed) == [], "modules missing from the README's layout"
    assert sorted(listed - modules) == [], "the README's layout lists modules that do not exist"
