"""Command: programs as tasks (results, errors, dependencies, MPI, kill, cache)."""

from __future__ import annotations

import os
import re
import shutil
import signal

import capabilities
import pytest
import taskfuncs as tf

from executorkit import Command, CommandError, CommandResult, SingleNodeExecutor
from executorkit.errors import TaskTimeoutError
from tests.conftest import wait_until

needs_mpiexec = capabilities.skip_unless("mpi")  # under CI a missing mpiexec fails


def test_result_output_files_and_cwd(make_executor, tmp_path):
    exe = make_executor(max_workers=2)
    res = exe.submit(Command(["echo", "hi", 3]), resource_dict={"cwd": str(tmp_path / "w")})
    result = res.result(timeout=60)
    assert isinstance(result, CommandResult)
    assert result.returncode == 0 and result.stdout == "hi 3\n"
    assert result.cwd == str(tmp_path / "w")
    with open(result.stdout_file) as fh:
        assert fh.read() == "hi 3\n"
    assert os.path.dirname(result.stdout_file) == str(tmp_path / "w")


def test_nonzero_exit_raises_with_stderr_tail(make_executor):
    exe = make_executor(max_workers=1)
    fut = exe.submit(Command(["sh", "-c", "echo one >&2; echo two >&2; exit 3"]))
    with pytest.raises(CommandError) as info:
        fut.result(timeout=60)
    assert info.value.returncode == 3
    assert info.value.result.stderr == "one\ntwo\n"
    assert "exited with code 3" in str(info.value) and "two" in str(info.value)


def test_env_and_shell(make_executor):
    exe = make_executor(max_workers=1)
    fut = exe.submit(Command("echo $GREETING | tr a-z A-Z", shell=True),
                     resource_dict={"env": {"GREETING": "hello"}})
    assert fut.result(timeout=60).stdout == "HELLO\n"


def test_futures_in_argv_and_stdin_are_dependencies(tmp_path):
    with SingleNodeExecutor(max_workers=2) as exe:
        first = exe.submit(Command(["echo", "hello"]))
        second = exe.submit(Command(["echo", first, "world"]))
        piped = exe.submit(Command(["tr", "a-z", "A-Z"], stdin=first))
        assert second.result(timeout=60).stdout == "hello world\n"
        assert piped.result(timeout=60).stdout == "HELLO\n"


def test_bad_commands_are_refused():
    with pytest.raises(TypeError, match="shell=True"):
        Command("echo hi")
    with pytest.raises(TypeError, match=r"argv\[1\]"):
        Command(["echo", {"a": 1}])
    with pytest.raises(ValueError, match="empty"):
        Command([])
    with SingleNodeExecutor(max_workers=1) as exe, pytest.raises(TypeError, match="argv"):
        exe.submit(Command(["echo"]), 1)


@needs_mpiexec
@pytest.mark.mpi
def test_mpi_program_runs_its_ranks():
    with SingleNodeExecutor(max_cores=2) as exe:
        fut = exe.submit(Command(["sh", "-c", "echo rank $PMI_RANK"]), resource_dict={"cores": 2})
        result = fut.result(timeout=120)
    assert sorted(result.stdout.split("\n")[:-1]) == ["rank 0", "rank 1"]
    assert result.args[1:3] == ["-n", "2"]  # started by mpiexec, no Python ranks


@needs_mpiexec
@pytest.mark.mpi
def test_mpi_program_whose_rank_fails():
    script = 'if [ "$PMI_RANK" = 1 ]; then echo rank one failed >&2; exit 4; fi'
    with SingleNodeExecutor(max_cores=2) as exe:
        fut = exe.submit(Command(["sh", "-c", script]), resource_dict={"cores": 2})
        with pytest.raises(CommandError, match="rank one failed") as info:
            fut.result(timeout=120)
    assert info.value.returncode != 0


def _pid_gone(path):
    def check():
        with open(path) as fh:
            pid = int(fh.read())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return check


STUBBORN = 'trap "" TERM; echo $$ > {pidfile}; while true; do sleep 0.05; done'


def test_program_ignoring_sigterm_dies_on_timeout(tmp_path):
    pidfile = tmp_path / "pid"
    with SingleNodeExecutor(max_workers=1) as exe:
        fut = exe.submit(Command(["sh", "-c", STUBBORN.format(pidfile=pidfile)]),
                         resource_dict={"run_time_max": 1})
        with pytest.raises(TaskTimeoutError):
            fut.result(timeout=60)
    wait_until(_pid_gone(pidfile))


def test_cancel_kills_the_program_group(tmp_path):
    pidfile = tmp_path / "pid"
    with SingleNodeExecutor(max_workers=1) as exe:
        fut = exe.submit(Command(["sh", "-c", STUBBORN.format(pidfile=pidfile)]))
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip())
        assert fut.cancel()
        wait_until(_pid_gone(pidfile))


def test_cache_covers_input_contents_and_requires_outputs(tmp_path):
    work, cache = tmp_path / "work", str(tmp_path / "cache")
    work.mkdir()
    (work / "in.txt").write_text("one")
    cmd = Command(["sh", "-c", "echo run >> runs.log; cat in.txt > out.txt"],
                  inputs=["in.txt"], outputs=["out.txt"])
    res = {"cwd": str(work)}

    def runs():
        with SingleNodeExecutor(max_workers=1, cache_directory=cache) as exe:
            exe.submit(cmd, resource_dict=res).result(timeout=60)
        return (work / "runs.log").read_text().count("run")

    assert runs() == 1
    assert runs() == 1  # a hit: same argv, env, cwd and input contents
    (work / "in.txt").write_text("two")
    assert runs() == 2  # input changed
    os.remove(work / "out.txt")
    assert runs() == 3  # declared output gone: not a hit
    assert (work / "out.txt").read_text() == "two"


def test_cache_key_covers_env(tmp_path):
    cache = str(tmp_path / "cache")
    cmd = Command(["sh", "-c", "echo $X"])
    with SingleNodeExecutor(max_workers=1, cache_directory=cache) as exe:
        a = exe.submit(cmd, resource_dict={"env": {"X": "1"}}).result(timeout=60)
        b = exe.submit(cmd, resource_dict={"env": {"X": "2"}}).result(timeout=60)
    assert (a.stdout, b.stdout) == ("1\n", "2\n")


def test_signal_death_of_program_is_reported(make_executor):
    exe = make_executor(max_workers=1)
    fut = exe.submit(Command(["sh", "-c", "kill -9 $$"]))
    with pytest.raises(CommandError) as info:
        fut.result(timeout=60)
    assert info.value.returncode == -signal.SIGKILL
    assert "killed by signal 9" in str(info.value)


@pytest.mark.skipif(shutil.which("true") is None, reason="needs /bin/true")
def test_map_over_commands():
    with SingleNodeExecutor(max_workers=2) as exe:
        results = list(exe.map(lambda c: c(), [Command(["true"])] * 3, timeout=60))
    assert [r.returncode for r in results] == [0, 0, 0]



LIST_FDS = 'ls -l /proc/$$/fd; echo "pmi ${PMI_FD:--1}"'


def test_missing_program_and_no_inherited_descriptors(make_executor, mode):
    exe = make_executor(max_workers=1)
    err = exe.submit(Command(["no-such-program-xyz", "1"])).exception(timeout=60)
    assert isinstance(err, FileNotFoundError) and "no-such-program-xyz" in str(err)
    # The program gets stdin, stdout and stderr only: never the worker's socket or files.
    lines = exe.submit(Command(["sh", "-c", LIST_FDS])).result(timeout=60).stdout.splitlines()
    pmi = int(lines.pop().split()[1])
    fds = dict(m.groups() for line in lines if (m := re.search(r"(\d+) -> (.*)$", line)))
    if mode.startswith("flux"):  # Flux's job shell adds its PMI socket and a /dev/null
        fds = {fd: what for fd, what in fds.items()
               if int(fd) != pmi and (int(fd) < 3 or what != "/dev/null")}
    assert sorted(map(int, fds)) == [0, 1, 2]


def test_programs_run_by_one_worker_keep_their_own_output_files(tmp_path):
    # One block-allocation worker runs both programs (same pid, same cwd): the second
    # call must not overwrite the files the first call's result names.
    from executorkit import SingleNodeExecutor

    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        first = exe.submit(Command(["echo", "one"]), resource_dict={"cwd": str(tmp_path)})
        first = first.result(timeout=60)
        second = exe.submit(Command(["echo", "two"]), resource_dict={"cwd": str(tmp_path)})
        second = second.result(timeout=60)
    assert first.stdout_file != second.stdout_file
    assert first.stderr_file != second.stderr_file
    with open(first.stdout_file) as fh:
        assert fh.read() == "one\n"
    with open(second.stdout_file) as fh:
        assert fh.read() == "two\n"


def test_cache_key_covers_declared_outputs(tmp_path):
    # Two Commands that differ only in the files they promise must not share an entry: the
    # second one's hit check would look at the wrong files.
    cache = str(tmp_path / "cache")
    cmd_a = Command(["sh", "-c", "echo x > a.txt; echo x > b.txt"], outputs=["a.txt"])
    cmd_b = Command(["sh", "-c", "echo x > a.txt; echo x > b.txt"], outputs=["b.txt"])
    with SingleNodeExecutor(max_workers=1, cache_directory=cache) as exe:
        a = exe.submit(cmd_a, resource_dict={"cwd": str(tmp_path)}).result(timeout=60)
        b = exe.submit(cmd_b, resource_dict={"cwd": str(tmp_path)}).result(timeout=60)
    assert a.outputs != b.outputs
    assert b.outputs == (str(tmp_path / "b.txt"),)


# --- per-task mode on this machine: the fork server starts the program itself -------------

def _allowed_cpus(text):
    """The CPU ids of a ``Cpus_allowed_list`` line ("0-2,5")."""
    cpus = set()
    for part in text.split(":")[1].strip().split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def test_program_is_started_by_the_fork_server_and_named_after_its_pid(tmp_path):
    # No Python worker in between: the program's parent is the fork server, and its output
    # files carry its own pid.
    with SingleNodeExecutor(max_workers=1) as exe:
        result = exe.submit(Command(["sh", "-c", "echo $$ $PPID"]),
                            resource_dict={"cwd": str(tmp_path)}).result(timeout=60)
        forkserver = exe._engine.launcher.process.pid
    pid, parent = map(int, result.stdout.split())
    assert parent == forkserver
    assert os.path.basename(result.stdout_file) == f"sh.{pid}.out"
    assert os.path.basename(result.stderr_file) == f"sh.{pid}.err"
    assert sorted(os.listdir(tmp_path)) == [f"sh.{pid}.err", f"sh.{pid}.out"]  # no leftovers


def test_program_gets_the_call_cpus_and_the_fork_server_keeps_its_own():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to observe pinning")
    show = ["grep", "Cpus_allowed_list", "/proc/self/status"]
    with SingleNodeExecutor(max_cores=2) as exe:
        one = exe.submit(Command(show)).result(timeout=60)
        forkserver = f"/proc/{exe._engine.launcher.process.pid}/status"
        both = exe.submit(Command(show), resource_dict={"threads_per_core": 2})
        both = both.result(timeout=60)
        with open(forkserver) as fh:
            own = next(line for line in fh if line.startswith("Cpus_allowed_list"))
    pool = set(sorted(os.sched_getaffinity(0))[:2])
    assert len(_allowed_cpus(one.stdout)) == 1 and _allowed_cpus(one.stdout) <= pool
    assert _allowed_cpus(both.stdout) == pool
    assert _allowed_cpus(own) == set(os.sched_getaffinity(0))  # restored after each start


def test_program_that_cannot_be_prepared_fails_only_its_call(monkeypatch):
    # cores=2 without an mpiexec: the call fails with the reason; the executor goes on.
    from executorkit.errors import ResourceError

    with SingleNodeExecutor(max_cores=2) as exe:
        monkeypatch.setattr(exe._engine.launcher, "mpiexec", ())
        fut = exe.submit(Command(["true"]), resource_dict={"cores": 2})
        with pytest.raises(ResourceError, match="mpiexec"):
            fut.result(timeout=60)
        assert exe.submit(Command(["echo", "on"])).result(timeout=60).stdout == "on\n"


def test_program_files_never_overwrite_earlier_ones(tmp_path):
    # pids are reused: a program whose <stem>.<pid> files exist gets <stem>.<pid>-2 files.
    from executorkit.transport import RunProgram
    from executorkit.worker import program

    msg = RunProgram(1, 7, ("sh", "-c", "echo new"), (), str(tmp_path), None, "sh")
    private = os.path.join(tmp_path, ".private")
    for ext in (".out", ".err"):
        (tmp_path / f"private{ext}").write_text("")
        os.rename(tmp_path / f"private{ext}", private + ext)
    (tmp_path / "sh.99.out").write_text("earlier\n")
    files = program._publish(private, os.path.join(tmp_path, "sh.99"))
    assert files == (str(tmp_path / "sh.99-2.out"), str(tmp_path / "sh.99-2.err"))
    assert (tmp_path / "sh.99.out").read_text() == "earlier\n"
    assert not os.path.exists(private + ".out")
    # started for real, the files are there and the private ones are gone
    running = program.start(msg, None)
    assert running.proc.wait(timeout=60) == 0
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    with open(running.end.files[0]) as fh:
        assert fh.read() == "new\n"


def test_program_files_keep_their_private_names_without_hard_links(tmp_path, monkeypatch):
    from executorkit.transport import RunProgram
    from executorkit.worker import program

    def no_links(*_):
        raise PermissionError("operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    msg = RunProgram(1, 7, ("sh", "-c", "echo out; echo err >&2"), (), str(tmp_path), None,
                     "sh")
    running = program.start(msg, None)
    assert running.proc.wait(timeout=60) == 0
    out, err = running.end.files
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (out, err))
    with open(out) as fh_out, open(err) as fh_err:
        assert (fh_out.read(), fh_err.read()) == ("out\n", "err\n")


def test_program_input_and_missing_program_in_the_fork_server(tmp_path):
    from executorkit.transport import RunProgram
    from executorkit.worker import program

    msg = RunProgram(1, 7, ("tr", "a-z", "A-Z"), (), str(tmp_path / "new"), None, "tr",
                     stdin=b"abc" * 100_000)
    running = program.start(msg, None)
    assert running.proc.wait(timeout=60) == 0
    with open(running.end.files[0]) as fh:
        assert fh.read() == "ABC" * 100_000
    missing = RunProgram(2, 8, ("no-such-program-xyz",), (), str(tmp_path), None, "x")
    with pytest.raises(FileNotFoundError):
        program.start(missing, None)
    assert os.listdir(tmp_path) == ["new"]  # nothing left of the failed start


def test_spare_variables_do_not_reach_calls_whose_env_does_not_name_them(tmp_path):
    # The executor-level env (A) is what idle per-task workers have; a call with an env of
    # its own (B only) sees no A, whether a worker or the fork server itself starts it.
    show = ["sh", "-c", "echo ${A-unset} ${B-unset} ${LD_BIND_NOW-unset}"]
    with SingleNodeExecutor(max_workers=2, resource_dict={"env": {"A": "1"}}) as exe:
        assert exe.submit(tf.env, "A").result(timeout=60) == {"A": "1"}  # spares forked
        assert exe.submit(Command(show)).result(timeout=60).stdout == "1 unset unset\n"
        own = {"env": {"B": "2"}}
        assert exe.submit(Command(show), resource_dict=own).result(timeout=60).stdout == \
            "unset 2 unset\n"
        assert exe.submit(tf.env, "A", "B", "LD_BIND_NOW", resource_dict=own).result(
            timeout=60) == {"A": None, "B": "2", "LD_BIND_NOW": None}


def test_apply_env_puts_the_spare_variables_back():
    from executorkit.worker.forkserver import apply_env

    environ = {"A": "spare", "B": "spare", "KEEP": "k"}
    apply_env(environ, (("B", "call"), ("C", "call")), {"A": None, "B": "before"})
    assert environ == {"B": "call", "C": "call", "KEEP": "k"}
    environ = {"A": "spare"}
    apply_env(environ, (), {"A": "before"})
    assert environ == {"A": "before"}
