"""`genq config`: one generated table of every GENQ_* variable, kept current in deploy/README.md;
`.env` files and the shared variable names are honoured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from genq.config import all_variables, markdown
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent


def test_every_variable_has_a_meaning_and_a_unique_name() -> None:
    found = all_variables()
    assert len(found) > 50
    assert [v.name for v in found if not v.meaning] == []
    names = [v.name for v in found]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"GENQ_[A-Z0-9_]+", n) for n in names)
    assert "GENQ_WORKER_WORKER_ID" not in names and "GENQ_WORKER_ID" in names


def test_deploy_readme_holds_the_current_table() -> None:
    text = (ROOT / "deploy" / "README.md").read_text()
    start = text.index("<!-- genq config --markdown -->\n") + len("<!-- genq config --markdown -->\n")
    end = text.index("<!-- end of genq config -->")
    assert text[start:end] == markdown(), "run: genq config --markdown, and paste it into deploy/README.md"


def test_dotenv_and_shared_names_are_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GENQ_WORKER_ID=from-dotenv\nGENQ_LOG_LEVEL=WARNING\nGENQ_QUEUE=dotq\n")
    code = (
        "from worker.settings import WorkerSettings; from api.settings import ApiSettings; "
        "w = WorkerSettings(); a = ApiSettings(); print(w.worker_id, w.log_level, a.queue, a.log_level)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["from-dotenv", "WARNING", "dotq", "WARNING"]


def test_old_worker_id_name_and_flags_still_work(monkeypatch) -> None:
    monkeypatch.setenv("GENQ_WORKER_WORKER_ID", "old-name")
    assert WorkerSettings().worker_id == "old-name"
    assert WorkerSettings(worker_id="flag", log_level="DEBUG").worker_id == "flag"  # flags by field name


def test_genq_config_command_prints_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "genq.cli", "config", "--markdown"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == markdown()


def test_genq_bench_runs_the_checkouts_benchmarks(tmp_path: Path) -> None:
    """`genq bench ...` is `python -m benchmarks ...`, from any working directory."""
    genq = Path(sys.executable).with_name("genq")
    out = subprocess.run([str(genq), "bench", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("queue", "redis", "batch", "batchcost", "fleet"):
        assert re.search(rf"│ {name}\s", out.stdout), name
