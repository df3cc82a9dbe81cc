"""The command line: run SPEC (our layout and Ensemble Launcher's), bad specs, info."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from executorkit.cli import main
from executorkit.cli._spec import SpecError, load_spec
from executorkit.ensemble import expand, linspace, logspace

SPEC = """
[ensembles.sweep]
command = "sh -c 'echo {a} {b}; test {b} != 2'"
relation = "many-to-many"
[ensembles.sweep.parameters]
a = "linspace(0, 1, 3)"
b = [1, 2]

[ensembles.fn]
function = "retry_funcs:add_one"
relation = "one-to-one"
[ensembles.fn.parameters]
x = "range(0, 3)"
"""


def test_expand_relations_and_generators():
    assert linspace(0, 10, 5) == [0.0, 2.5, 5.0, 7.5, 10.0]
    assert logspace(0, 2, 3) == [1.0, 10.0, 100.0]
    assert expand({"a": [1, 2], "b": "range(2)"}, "one-to-one") == [
        {"a": 1, "b": 0}, {"a": 2, "b": 1}]
    assert len(expand({"a": [1, 2], "b": [3, 4, 5]}, "many-to-many")) == 6
    with pytest.raises(ValueError, match="one length"):
        expand({"a": [1, 2], "b": [1]}, "one-to-one")
    with pytest.raises(ValueError, match="unknown generator 'linspce'"):
        expand({"a": "linspce(0, 1, 2)"})


def test_dry_run_prints_the_calls(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    assert main(["run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep[5]: sh -c 'echo 1.0 2; test 2 != 2'" in out
    assert "fn[2]: retry_funcs:add_one(x=2)" in out
    assert not (tmp_path / "spec.cache").exists()


def test_run_writes_results_and_fails_when_a_call_failed(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    code = main(["run", str(spec), "--no-progress", "--max-workers", "2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "9 call(s): 6 done, 3 failed" in out and "sweep[1] failed: CommandError" in out
    with open(tmp_path / "spec.cache.results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows if r["ensemble"] == "sweep"] == ["done", "failed"] * 3
    assert [r["output"] for r in rows if r["ensemble"] == "fn"] == ["1", "2", "3"]
    data = json.loads((tmp_path / "spec.cache.results.json").read_text())
    assert data[0]["output"] == "0.0 1"
    assert os.path.isdir(tmp_path / "spec.cache")


def test_ensemble_launcher_layout_is_accepted(tmp_path, capsys):
    spec = tmp_path / "config.json"
    spec.write_text(json.dumps({"poll_interval": 1, "ensembles": {"E": {
        "nnodes": 1, "ppn": 1, "cmd_template": "echo {arg1}", "arg1": "linspace(0, 10, 5)",
        "relation": "one-to-one"}}}))
    [ens] = load_spec(str(spec))
    assert ens.resource_dict["num_nodes"] == 1 and ens.resource_dict["cores"] == 1
    assert [c["arg1"] for c in ens.calls] == [0.0, 2.5, 5.0, 7.5, 10.0]
    assert main(["run", str(spec), "--no-progress"]) == 0
    assert "5 call(s): 5 done" in capsys.readouterr().out


@pytest.mark.parametrize(("body", "key"), [
    ('[ensembles.s]\ncommand = "echo {a}"\ncores = "2"\n[ensembles.s.parameters]\na = [1]\n',
     "cores"),
    ('[ensembles.s]\ncommand = "echo {a}"\ncoers = 2\n[ensembles.s.parameters]\na = [1]\n',
     "coers"),
    ('[ensembles.s]\ncommand = "echo {a}"\n[ensembles.s.parameters]\na = "linspce(0, 1, 2)"\n',
     "a"),
    ('[ensembles.s]\ncommand = "echo {a} {b}"\n[ensembles.s.parameters]\na = [1]\n', "b"),
    ('[ensembles.s]\ncommand = "echo {a}"\nrelation = "zip"\n[ensembles.s.parameters]\na = [1]\n',
     "relation"),
    ('[ensembles.s]\nfunction = "nomodule"\n', "function"),
    # fields that cannot be filled in: an error of the spec, not a traceback at run time
    ('[ensembles.s]\ncommand = "echo {} {a}"\n[ensembles.s.parameters]\na = [1]\n', "command"),
    ('[ensembles.s]\ncommand = "echo {a[0]}"\n[ensembles.s.parameters]\na = [1]\n', "command"),
    ('[ensembles.s]\ncommand = "echo {a:d}"\n[ensembles.s.parameters]\na = [0.5]\n', "command"),
    ('[ensembles.s]\ncommand = "echo \'{a}"\n[ensembles.s.parameters]\na = [1]\n', "command"),
    ('[ensembles.s]\ncommand = "echo {a"\n[ensembles.s.parameters]\na = [1]\n', "command"),
])
def test_bad_spec_names_file_ensemble_and_key(tmp_path, capsys, body, key):
    spec = tmp_path / "bad.toml"
    spec.write_text(body)
    with pytest.raises(SpecError) as info:
        load_spec(str(spec))
    assert (info.value.path, info.value.ensemble, info.value.key) == (str(spec), "s", key)
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and "'s'" in err and repr(key) in err


def test_unparsable_file_and_unknown_format(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("[ensembles\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(str(bad))
    other = tmp_path / "x.ini"
    other.write_text("")
    with pytest.raises(SpecError, match=r"allowed: \.toml, \.json"):
        load_spec(str(other))


def test_python_m_executorkit_info():
    proc = subprocess.run([sys.executable, "-m", "executorkit", "info"], capture_output=True,
                          text=True, timeout=120, check=True)
    for word in ("cpus", "gpus", "slurm", "flux", "mpiexec", "mpi4py", "executorkit"):
        assert any(line.startswith(word) for line in proc.stdout.splitlines()), word


def test_literal_braces_in_a_template_are_not_parameters(tmp_path, capsys):
    spec = tmp_path / "awk.toml"
    spec.write_text('[ensembles.s]\ncommand = "awk \'BEGIN {{print {a} + 1}} END {{print NR}}\'"\n'
                    '[ensembles.s.parameters]\na = [1, 2]\n')
    [ens] = load_spec(str(spec))
    assert [c["a"] for c in ens.calls] == [1, 2]
    assert main(["run", str(spec), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "awk.cache.results.json").read_text())
    assert [r["output"] for r in rows] == ["2\n0", "3\n0"]


def test_el_layout_with_a_bad_template_is_a_spec_error(tmp_path):
    spec = tmp_path / "config.json"
    spec.write_text(json.dumps({"ensembles": {"E": {"cmd_template": "echo {}", "a": [1]}}}))
    with pytest.raises(SpecError) as info:
        load_spec(str(spec))
    assert info.value.key == "cmd_template" and "positional" in str(info.value)


def test_report_of_a_directory_without_entries_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "holds no cache entries" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()

