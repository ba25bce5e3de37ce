"""A researcher's first hour (issue 15): every input mistake is one line and exit 2, seconds after the start and
before the heavy imports; threads fit the machine; a run tells its plan and its result; `marl-exp sample`."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, compose
from marl_exp import cli, provenance
from marl_exp.config import ConfigError, project_root, validate
from marl_exp.run import console, preflight, threads

HEAVY = ("torch", "transformers", "peft", "trl", "wandb", "bitsandbytes", "datasets")


# ------------------------------------------------------------------------------------ fake artifacts
def _safetensors(path: Path, names: list[str]) -> None:
    """A valid safetensors file with one float32 zero per tensor (only its header matters to the checks)."""
    header, offset = {}, 0
    for name in names:
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [offset, offset + 4]}
        offset += 4
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * offset)


def fake_model(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "seed": seed}))
    _safetensors(path / "model.safetensors", [f"model.layers.{seed}.weight"])
    return path


def fake_reward_adapter(path: Path, base: Path) -> Path:
    from marl_exp.provenance import fingerprint

    (path).mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    _safetensors(path / "adapter_model.safetensors", ["base_model.model.layers.0.lora_A.weight",
                                                      "base_model.model.score.weight"])
    (path / "marl_exp_base.json").write_text(json.dumps({"base_model": str(base), "fingerprint": fingerprint(base)}))
    return path


def fake_policy_adapter(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    _safetensors(path / "adapter_model.safetensors", ["base_model.model.layers.0.lora_A.weight"])
    _safetensors(path / "value_head.safetensors", ["summary.weight"])
    return path


@pytest.fixture
def artifacts(tmp_path):
    sft = fake_model(tmp_path / "sft")
    other = fake_model(tmp_path / "other_base", seed=1)
    run = tmp_path / "reward_run"
    (run / ".hydra").mkdir(parents=True)
    (run / "run_record.json").write_text("{}")
    reward = fake_reward_adapter(run / "reward_adapter", sft)
    (tmp_path / "a_file").write_text("not a directory")
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    return {"sft": sft, "other": other, "reward": reward, "reward_run": run,
            "policy": fake_policy_adapter(tmp_path / "ppo_run" / "policies" / "policy"),
            "file": tmp_path / "a_file", "config_only": config_only, "empty": tmp_path}


# ------------------------------------------------------------------------------------ bad-input table
# (overrides, a fragment of the one-line message, origin). Origin "issue" = listed in issue 15 (or bug 8 of
# issue 12), "new" = added here. {sft}, {reward}, ... are the fake artifacts above.
BAD_INPUTS = [
    # -- the issue's cases
    (["stage.sft_model={reward}"], "stage.sft_model='{reward}' is a reward adapter (LoRA + score head), not a model "
                                   "directory", "issue"),
    (["stage.sft_model={other}", "stage.reward_adapter={reward}"], "set stage.allow_base_mismatch=true", "issue"),
    (["output_dir={file}/outputs"], "output_dir='{file}/outputs' cannot be created or written: Not a directory",
     "issue"),
    (["model.path=/no/such/model"], "model.path='/no/such/model' does not exist", "issue"),
    (["model=gpt2"], "model.path='openai-community/gpt2' is not a local path and not in the Hugging Face cache",
     "issue"),
    (["data=imdb"], "data.path='stanfordnlp/imdb' is not a local path and not in the Hugging Face cache", "issue"),
    (["stage.batch_size=64", "stage.optim.mini_batch_size=24"],
     "stage.batch_size=64 is not divisible by stage.optim.mini_batch_size=24; use a divisor such as stage.optim.mini_batch_size=16",
     "issue"),
    (["learning_rate=1e-4"], "learning_rate=1e-4 is not a config key; did you mean stage.optim.learning_rate", "issue"),
    (["+learning_rate=1e-4"], "learning_rate=0.0001 is not a config key; did you mean stage.optim.learning_rate", "issue"),
    (["model=gtp2"], "model=gtp2 is not a model option; did you mean model=gpt2? (options: gpt2, llama-7b, smollm2, tiny)",
     "issue"),
    (["+adapter.lora_droput=0.1"], "adapter.lora_droput=0.1 is not a config key; did you mean adapter.lora_dropout?",
     "issue"),
    (["stage=reward", "stage.sft_model={reward}"], "stage.sft_model='{reward}' is a reward adapter", "issue"),
    (["hydra.run.dir={file}/run"], "hydra.run.dir='{file}/run' cannot be created: {file} is a file", "issue"),
    # -- new ones
    (["stage=ppx"], "stage=ppx is not a stage option; did you mean stage=ppo? (options: grpo, ppo, reinforce_pp, reward, rloo, sft)", "new"),
    (["debug=pp0"], "debug=pp0 is not a debug option; did you mean debug=ppo?", "new"),
    (["+sweep=lorarank"], "sweep=lorarank is not a sweep option; did you mean sweep=lora_rank?", "new"),
    (["adapter.rank=8"], "adapter.rank=8 is not a config key; did you mean adapter.r?", "new"),
    (["stage.lr=0.1"], "stage.lr=0.1 is not a config key; did you mean stage.optim.learning_rate?", "new"),
    (["data.columns.txt=body"], "data.columns.txt=body is not a config key; did you mean data.columns.text?", "new"),
    # An RL key without its heading (TRL's flat name, marl-exp's before the headings) names where it lives.
    (["stage.learning_rate=1e-4"], "stage.learning_rate=1e-4 is not a config key; did you mean stage.optim.learning_rate?",
     "new"),
    (["stage=grpo", "stage.num_generations=8"],
     "stage.num_generations=8 is not a config key; did you mean stage.sampling.num_generations?", "new"),
    (["stage.beta=0.1"], "stage.beta=0.1: stage.kl.beta is a key of stage=grpo/rloo/reinforce_pp, not of stage=ppo; "
     "drop it or set stage=grpo", "new"),
    (["stage=sft", "stage.max_new_tokens=8"], "stage.max_new_tokens=8: stage.sampling.max_new_tokens is a key of "
     "stage=ppo/grpo/rloo/reinforce_pp, not of stage=sft", "new"),
    (["+model.tiny.hiden=3"], "model.tiny.hiden=3 is not a config key; did you mean model.tiny.hidden_size?", "new"),
    (["stage=sft", "+stage.reward_adapter=x"], "stage.reward_adapter=x is a key of stage=ppo/grpo/rloo/reinforce_pp, not of stage=sft", "new"),
    (["adapter.r=eight"], "adapter.r=eight: Value 'eight' of type 'str' could not be converted to Integer", "new"),
    (["adapter.target_modules=q_proj"], "adapter.target_modules is a list; write adapter.target_modules=[q_proj]",
     "new"),
    (["+adapter.r=8"], "+adapter.r: adapter.r already exists; drop the + (adapter.r=8)", "new"),
    (["~adapter.zz"], "~adapter.zz: there is no such key to delete", "new"),
    (["stage.policies=a,b"], "stage.policies=a,b is ambiguous: write stage.policies=[a,b] for a list", "new"),
    (["stage.sampling.top_p=["], "cannot parse the override 'stage.sampling.top_p=['", "new"),
    (["threads=0"], "threads='0' is not valid; use threads=auto or a number of threads >= 1", "new"),
    (["upstream.reward.quant=3bit"], "upstream.reward.quant='3bit' is not valid; use one of same, fp32", "new"),
    (["upstream.sft.quant=4bit", "upstream.sft.finetune=full"], "upstream.sft.finetune=full cannot train 4bit", "new"),
    (["upstream.reward.adapter.r=0"], "upstream.reward.adapter.r=0 must be > 0", "new"),
    (["model.path=builtin:huge"], "model.path='builtin:huge' is not a built-in model; they are builtin:tiny, builtin:smollm2",
     "new"),
    (["stage.reward_adapter={sft}"], "stage.reward_adapter='{sft}' is a model directory, not a reward adapter", "new"),
    (["stage.reward_adapter={policy}"], "stage.reward_adapter='{policy}' is a PPO policy adapter", "new"),
    (["stage.sft_model={reward_run}"], "it holds {reward_run}/reward_adapter: give the one you mean", "new"),
    (["model.path={empty}"], "model.path='{empty}' is a directory without a model or an adapter", "new"),
    (["model.path={config_only}"], "has a config.json but no weights", "new"),
    (["output_dir={file}"], "output_dir='{file}' is a file, not a directory", "new"),
    (["stage.resume=/nonexistent"], "stage.resume='/nonexistent' does not exist", "new"),
    (["data=imdb", "data.path=/no/such/imdb"], "data.path='/no/such/imdb' does not exist", "new"),
    (["stage.sft_model=./no_such_dir"], "stage.sft_model='./no_such_dir' does not exist", "new"),
]


def test_bad_input_table_covers_the_issue_and_as_many_new_cases():
    origins = [origin for *_, origin in BAD_INPUTS]
    assert len(BAD_INPUTS) >= 30 and origins.count("new") >= origins.count("issue") >= 12


@pytest.fixture
def app(monkeypatch, tmp_path, capsys):
    """Runs the real command-line entry (``python train.py`` minus the interpreter start) in this process:
    returns (exit code, stderr lines, stdout). Fails the test if a stage would start."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))  # gpt2 & co. are never cached here
    monkeypatch.chdir(tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the stage started: the mistake was not caught by the checks")

    monkeypatch.setattr(cli, "_run", must_not_run)
    root = logging.getLogger()

    def run(*overrides: str):
        handlers, level = list(root.handlers), root.level
        monkeypatch.setattr(sys, "argv", ["train.py", *overrides, "logger=none", f"output_dir={tmp_path / 'out'}"]
                            if not any(o.startswith("output_dir=") for o in overrides)
                            else ["train.py", *overrides, "logger=none"])
        capsys.readouterr()
        try:
            cli.run_app(REPO / "conf")
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:  # Hydra configures logging on the way: leave the process as it was
            root.handlers[:], root.level = handlers, level
        out = capsys.readouterr()
        return code, [line for line in out.err.splitlines() if line.strip()], out.out

    return run


@pytest.mark.parametrize("overrides,fragment,origin", BAD_INPUTS, ids=[" ".join(o) for o, *_ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(app, artifacts, overrides, fragment, origin):
    paths = {k: str(v) for k, v in artifacts.items()}
    code, errors, _ = app(*(o.format(**paths) for o in overrides))
    assert code == 2, errors
    assert len(errors) == 1, errors
    assert errors[0].startswith("marl-exp: error: ") and "Traceback" not in errors[0]
    assert fragment.format(**paths) in errors[0]
    assert "hf download /" not in errors[0]  # a filesystem path is never sent to the hub


def test_a_bad_input_writes_nothing(app, tmp_path):
    code, _, _ = app("adapter.r=0")
    assert code == 2
    assert not (tmp_path / "out" / "runs").exists()  # the checks run before Hydra creates the run dir


def test_unknown_key_added_with_plus_fails_in_validate():
    """Issue 12, bug 8: on main `+adapter.lora_droput=0.1` validated and the run ignored it."""
    with pytest.raises(ConfigError) as err:
        validate(compose("+adapter.lora_droput=0.1"))
    assert str(err.value) == "adapter.lora_droput=0.1 is not a config key; did you mean adapter.lora_dropout?"
    with pytest.raises(ConfigError, match=r"^data\.columns\.txt=body is not a config key; did you mean data\.columns\.text\?"):
        validate(compose("+data.columns.txt=body"))
    validate(compose("+sweep=lora_rank"))  # a config group added with + is not a key: still fine


BATCH_DRIVER = """
import contextlib, io, json, sys, time
from pathlib import Path
from marl_exp import cli
rows = json.loads(sys.argv[1])
results = []
for argv in rows:
    sys.argv = ["train.py", *argv]
    err = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err):
            cli.run_app(Path("conf").resolve())
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    results.append({"argv": argv, "code": code, "seconds": time.perf_counter() - started,
                    "stderr": [l for l in err.getvalue().splitlines() if l.strip()]})
heavy = sorted(m for m in %r if m in sys.modules)
print(json.dumps({"results": results, "heavy_imported": heavy}))
""" % (HEAVY,)


def test_cli_reports_mistakes_in_seconds_without_importing_the_heavy_stack(tmp_path, artifacts):
    """End to end in one fresh interpreter (imports paid once): several kinds of mistake, each exit 2 with
    one line, and torch, transformers, peft, trl, wandb never imported."""
    out = f"output_dir={tmp_path / 'out'}"
    rows = [["adapter.r=0", out], ["model=gtp2", out], ["learning_rate=1e-4", out],
            ["+adapter.lora_droput=0.1", out], [f"stage.sft_model={artifacts['reward']}", out],
            [f"output_dir={artifacts['file']}/x"], ["model=gpt2", out]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    env.pop("HYDRA_FULL_ERROR", None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BATCH_DRIVER, json.dumps(rows)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy_imported"] == []
    for row in report["results"]:
        assert row["code"] == 2 and len(row["stderr"]) == 1, row
        assert row["stderr"][0].startswith("marl-exp: error: ")
        assert row["seconds"] < 30, row  # generous: about 0.1-0.5 s each here, on a busy 2-core machine
    assert wall < 120


def test_python_train_py_bad_override_takes_seconds(tmp_path):
    """The real command, interpreter start included (measured 1.2-1.4 s here; ~5.5 s before this issue)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "+adapter.lora_droput=0.1", f"output_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "marl-exp: error: adapter.lora_droput=0.1 is not a config key; did you mean adapter.lora_dropout?"]
    assert seconds < 30  # generous for a loaded CI machine


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "train.py", "learning_rate=1e-4", f"output_dir={tmp_path}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr


# --------------------------------------------------------------------------------------- hub checks
def test_hub_unreachable_is_one_line_at_once_and_a_cached_copy_is_used_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port on loopback: nothing leaves the machine
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"model.path='org/not-cached' is not a local path and not in the Hugging "
                                          r"Face cache .*and the hub \(http://127.0.0.1:9\) is unreachable"):
        preflight.check_model_path("org/not-cached")
    assert time.perf_counter() - started < 10  # one refused connection, no retries
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc123"
    fake_model(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    preflight.check_model_path("org/cached")  # cached: fine, and the libraries are told not to retry the hub
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert provenance.local_model_dir("org/cached") == snapshot  # what the model code reads too


class _Hub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/api/models/org/exists" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hub_answers_which_ids_exist(tmp_path, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        preflight.check_model_path("org/exists")
        with pytest.raises(ConfigError, match="the hub has no model of that name"):
            preflight.check_model_path("org/typo")
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------- real artifacts
def test_kinds_and_base_check_on_real_stage_outputs(trained_chain, tmp_path):
    sft, reward = Path(trained_chain["sft_model"]), Path(trained_chain["reward_adapter"])
    assert preflight.local_kind(sft) == "model"
    assert preflight.local_kind(reward) == "reward_adapter"
    assert preflight.local_kind(reward.parent) == "run_dir"
    assert preflight.local_kind(sft.parent) == "run_dir"  # a stage-cache entry
    preflight.check_same_base(str(reward), str(sft), allow_mismatch=False)
    from marl_exp.config import TinyArchConfig
    from marl_exp.modeling.tiny import builtin_model_dir

    other = builtin_model_dir(TinyArchConfig())  # the untrained base: another fingerprint
    with pytest.raises(ConfigError, match="or set stage.allow_base_mismatch=true"):
        preflight.check_same_base(str(reward), str(other), allow_mismatch=False)
    preflight.check_same_base(str(reward), str(other), allow_mismatch=True)


def test_given_reward_adapter_is_checked_against_the_sft_model_the_cache_would_use(artifacts, tmp_path):
    """No stage.sft_model: the SFT comes from the stage cache; an adapter trained on another base fails before
    anything is built."""
    cfg = compose("stage=ppo", "logger=none", f"output_dir={tmp_path / 'out'}",
                  f"stage.reward_adapter={artifacts['reward']}")
    with pytest.raises(ConfigError, match="this run's SFT model is '.*/cache/sft-[0-9a-f]+/model'.*allow_base_mismatch"):
        cli.upstream_sources(cfg)
    assert not (tmp_path / "out" / "cache").exists() or not list((tmp_path / "out" / "cache").glob("sft-*"))


# ------------------------------------------------------------------------------- interrupts, leftovers
@pytest.fixture
def sigint_raises():
    """SIGINT as Python sets it up in a terminal: a background job of a non-interactive shell (``pytest &``)
    starts with SIGINT ignored, and Python then installs no handler; these tests would wait forever."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_waiting_for_the_cache_lock_is_one_line_exit_130(tmp_path, capsys, sigint_raises):
    import fcntl

    from marl_exp.stages.pipeline import cache_dir, upstream_config

    cfg = compose("stage=reward", "logger=none", f"output_dir={tmp_path}")
    target = cache_dir(upstream_config(cfg, "sft"))
    target.parent.mkdir(parents=True)
    class CtrlCWhileWaiting(logging.Handler):  # Ctrl-C once the run says it waits for the lock
        def emit(self, record):
            if record.getMessage().startswith("another job is building"):
                # To the process, as a terminal sends it: any thread may receive it.
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()

    waiting = CtrlCWhileWaiting()
    logging.getLogger("marl_exp.stages.pipeline").addHandler(waiting)
    try:
        with open(target.with_name(f".{target.name}.lock"), "a") as held:  # another job is building this entry
            fcntl.flock(held, fcntl.LOCK_EX)
            with pytest.raises(SystemExit) as exit_:
                cli.main(cfg, run_dir=tmp_path / "run")
    finally:
        logging.getLogger("marl_exp.stages.pipeline").removeHandler(waiting)
    assert exit_.value.code == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("marl-exp")]
    assert len(lines) == 1 and lines[0].startswith("marl-exp: interrupted (Ctrl-C); stopped at once. Rerun with: ")
    assert not list(tmp_path.glob("cache/.sft-*.building-*"))


def test_a_failed_upstream_build_leaves_no_building_dir(tmp_path, monkeypatch):
    from marl_exp.stages import sft

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sft, "run", broken)
    cfg = compose("stage=reward", "logger=none", f"output_dir={tmp_path}")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(cfg, run_dir=tmp_path / "run")
    assert not list((tmp_path / "cache").glob(".sft-*.building-*"))  # no stale build dir (the lock file stays)
    assert (tmp_path / "run" / cli.FAILURE_MARKER).exists()


# ------------------------------------------------------------------------------------------- threads
@pytest.mark.parametrize("cpus,cores,jobs,expected", [
    (2, 2, 1, 1),  # the issue's machine: one CPU left for the other busy process
    (2, 1, 1, 1),
    (1, 1, 1, 1),
    (16, 8, 1, 8),  # hyper-threads: one thread per physical core (torch's own default)
    (16, 16, 1, 15),
    (16, 16, 2, 7),  # two parallel launcher jobs split the rest
    (2, 2, 2, 1),
    (64, 32, 4, 8),
])
def test_auto_threads_rule(cpus, cores, jobs, expected):
    assert threads.auto_threads(cpus, cores, jobs)[0] == expected


def test_thread_setting_precedence(monkeypatch):
    assert threads.choose("3", env={"OMP_NUM_THREADS": "5"}).threads == 3  # threads=N wins
    assert threads.choose("auto", env={"OMP_NUM_THREADS": "5"}).threads == 5  # then the user's environment
    mine = {"OMP_NUM_THREADS": "5", threads.OURS: "5"}  # set by marl-exp itself: recomputed
    monkeypatch.setattr(threads, "available_cpus", lambda: 16)
    monkeypatch.setattr(threads, "physical_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.choose("auto", env=mine).threads == 15


def test_parallel_launcher_jobs_split_the_cores(monkeypatch):
    """The job of a `-m hydra/launcher=local_parallel` sweep sees the launcher's n_jobs (2) in its Hydra config."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from marl_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["hydra/launcher=local_parallel"],
                            return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    monkeypatch.setattr(threads, "available_cpus", lambda: 16)
    monkeypatch.setattr(threads, "physical_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        choice = threads.choose("auto", env={})
    finally:
        HydraConfig.instance().cfg = saved
    assert choice.threads == 7 and "shared by 2 parallel launcher jobs" in choice.reason
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun / accelerate: processes on this node
    assert threads.choose("auto", env={}).threads == 3


def test_configure_sets_openmp_before_torch_and_logs_once(monkeypatch, caplog):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", threads.OURS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_applied", None)
    monkeypatch.setattr(threads, "apply_to_torch", lambda n: None)  # this test process's torch stays as it is
    with caplog.at_level(logging.INFO, logger="marl_exp"):
        first = threads.configure("2")
        threads.configure("2")
    assert first.threads == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    # An explicit threads=N owns its cores: a short spin, not a sleep at every barrier.
    assert os.environ["GOMP_SPINCOUNT"] == threads.SHORT_SPIN and "OMP_WAIT_POLICY" not in os.environ
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("threads:")] == [
        f"threads: 2 torch/OpenMP threads (threads=2; GOMP_SPINCOUNT={threads.SHORT_SPIN}); override with threads=N"]


@pytest.mark.parametrize("setting, env, expected", [
    ("auto", {}, {"OMP_WAIT_POLICY": "PASSIVE"}),  # auto assumes a shared machine: sleep while waiting
    ("1", {}, {"OMP_WAIT_POLICY": "PASSIVE"}),  # one thread has no one to wait for
    ("2", {}, {"GOMP_SPINCOUNT": threads.SHORT_SPIN}),
    ("auto", {"OMP_NUM_THREADS": "4"}, {"OMP_WAIT_POLICY": "PASSIVE"}),  # the environment's count: maybe shared
    ("2", {"OMP_WAIT_POLICY": "ACTIVE"}, {}),  # the user's own wait setting is kept
    ("2", {"GOMP_SPINCOUNT": "0"}, {}),
])
def test_wait_policy_follows_the_thread_choice(setting, env, expected):
    assert threads.wait_policy(threads.choose(setting, env=env), env) == expected


# ------------------------------------------------------------------------------------------- console
def test_progress_bars_become_periodic_lines_off_a_terminal():
    now = [0.0]
    sink = io.StringIO()
    stream = console.ProgressLines(sink, every_s=30, clock=lambda: now[0])
    stream.write("log line\n")
    for second in range(0, 100, 5):  # a bar redrawn every 5 s for 95 s
        now[0] = second
        stream.write(f"\rPPO: {second}%|##| {second}/100   ")
    stream.write("\n")  # tqdm's close (leave=True)
    stream.write("\rLoading weights: 100%|##| 30/30 ")  # a bar that lives less than 30 s prints nothing
    stream.write("\r" + " " * 40 + "\r")
    stream.write("done\n")
    assert sink.getvalue().splitlines() == ["log line", "PPO: 30%|##| 30/100", "PPO: 60%|##| 60/100",
                                            "PPO: 90%|##| 90/100", "PPO: 95%|##| 95/100", "done"]


def test_noisy_library_messages_are_filtered():
    console.quiet_libraries()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    record = bnb.makeRecord(bnb.name, logging.WARNING, __file__, 1, "Failed to load CPU gemm_4bit_forward from "
                            "kernels-community: %s.", ("No module named 'kernels'",), None)
    assert not bnb.filter(record)
    report = logging.getLogger("transformers.modeling_utils")
    expected = ("\x1b[1mLlamaForSequenceClassification LOAD REPORT\x1b[0m from: /x\nKey | Status |\n---+---+\n"
                "lm_head.weight | UNEXPECTED |\nscore.weight | MISSING |\n")
    surprising = expected.replace("lm_head.weight | UNEXPECTED", "model.layers.0.mlp.up_proj.weight | MISSING")
    assert not report.filter(report.makeRecord(report.name, logging.WARNING, __file__, 1, expected, (), None))
    assert report.filter(report.makeRecord(report.name, logging.WARNING, __file__, 1, surprising, (), None))


def test_plan_names_roles_sources_and_upstream_settings(tmp_path):
    cfg = compose("stage=ppo", "quant=4bit", "adapter.r=8", "upstream.reward.adapter.r=4", f"output_dir={tmp_path}")
    text = console.plan(cfg, tmp_path / "run", {"sft": ("/c/sft-1/model", "cached"),
                                               "reward": ("/c/reward-2/reward_adapter", "to build")}, "1 thread")
    lines = text.splitlines()
    assert lines[0] == "marl-exp: stage=ppo | model builtin:tiny | quant 4bit nf4, compute float32 | 1 thread"
    assert "policy     policy: LoRA r=8 alpha=32" in text and "reference  the base with every adapter off" in text
    assert ("base       /c/sft-1/model (reused from the stage cache; upstream.sft: full fine-tune, fp32, 2 epochs"
            in text)
    assert ("reward     /c/reward-2/reward_adapter (built now into the stage cache; upstream.reward: LoRA r=4 "
            "alpha=32 dropout=0.0 on all-linear, 4bit nf4, compute float32 (same as quant)") in text
    assert f"run dir    {tmp_path / 'run'}" in text


@pytest.mark.parametrize("mode, native, device, full, expected, hint", [
    ("fp32", (True, "this CPU has avx512_bf16"), "cpu", False, "fp32 weights, adapters and compute (quant=fp32)",
     "this CPU has avx512_bf16, for bf16 matmuls in hardware (quant=bf16)"),
    ("fp32", (False, ""), "cpu", False, "fp32 weights, adapters and compute (quant=fp32)", None),
    ("bf16", (False, ""), "cpu", False, "bf16 base weights and base matmuls; adapters, heads and optimizer state in "
     "fp32", "this CPU has no bf16 matmul instructions (amx_bf16, avx512_bf16): bf16 may be slower than fp32"),
    ("bf16", (None, ""), "cpu", False, "bf16 base weights", None),  # flags unreadable (macOS, ARM): no claim
    ("bf16", (True, "this CPU has amx_bf16"), "cpu", False, "bf16 base weights and base matmuls", None),
    ("bf16", (False, ""), "cuda", False, "bf16 base weights and base matmuls", None),  # no CPU instruction to name
    ("bf16", (True, "this CPU has avx512_bf16"), "cpu", True,
     "fp32 weights (every one is trained), bf16 matmuls under autocast (quant=bf16)", None),  # a full-weight SFT
    ("4bit", (True, "this CPU has avx512_bf16"), "cpu", False, "4-bit base weights (nf4, compute float32); adapters, "
     "heads and optimizer state in fp32 (quant=4bit)", None),
])
def test_the_plan_says_which_precision_the_run_uses_and_what_the_device_offers(mode, native, device, full, expected,
                                                                                hint):
    cfg = compose(f"quant={mode}")
    line = console.precision(cfg.quant, native, device, full_finetune=full)
    assert line.startswith(expected)
    assert (hint in line) if hint else ("; " not in line.split(f"(quant={mode})")[1])
    text = console.plan(cfg, Path("/r"), {"sft": ("/s", "given"), "reward": ("/w", "given")}, "1 thread", line)
    assert text.splitlines()[1] == f"  precision  {line}"


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    from marl_exp.run import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    assert hardware.native_bf16("cpu") == (True, "this CPU has amx_bf16")  # AMX named first: the faster one
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert hardware.native_bf16("cpu") == (False, "")
    monkeypatch.setattr(hardware, "cpu_flags", set)  # no flags to read: it cannot tell
    assert hardware.native_bf16("cpu") == (None, "")


def test_a_gpu_that_only_emulates_bf16_is_not_called_native(monkeypatch):
    import torch

    from marl_exp.run import hardware

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or including_emulation)  # a pre-Ampere GPU: bf16 by emulation only
    assert hardware.native_bf16("cuda") == (False, "") and asked == [False]


def test_upstream_adapter_and_quant_are_explicit_and_keep_old_cache_hashes(tmp_path):
    from omegaconf import OmegaConf

    from marl_exp.config import AdapterConfig, Config, QuantConfig, STAGE_SCHEMAS
    from marl_exp.stages.pipeline import config_hash, upstream_config

    def old_formula(cfg, stage):  # how the cache built upstream configs before issue 15 (fixed settings)
        node = OmegaConf.merge(OmegaConf.structured(STAGE_SCHEMAS[stage]),
                               {k: v for k, v in OmegaConf.to_container(cfg.upstream[stage]).items()
                                if k not in ("adapter", "quant")})
        quant = cfg.quant if stage == "reward" else OmegaConf.structured(QuantConfig)
        return OmegaConf.merge(OmegaConf.structured(Config), {
            "model": cfg.model, "data": cfg.data, "seed": cfg.seed, "quant": quant, "stage": node,
            "adapter": OmegaConf.structured(AdapterConfig), "output_dir": str(tmp_path)})

    for overrides in ([], ["quant=4bit"], ["quant=bf16", "upstream.sft.learning_rate=0.1"]):
        cfg = compose(*overrides, f"output_dir={tmp_path}")
        for stage in ("sft", "reward"):
            assert config_hash(upstream_config(cfg, stage)) == config_hash(old_formula(cfg, stage))
    cfg = compose("upstream.reward.adapter.r=4", "upstream.reward.quant=8bit", "upstream.sft.quant=4bit")
    reward, sft = upstream_config(cfg, "reward"), upstream_config(cfg, "sft")
    assert reward.adapter.r == 4 and reward.quant.mode == "8bit" and sft.quant.mode == "4bit"
    assert "adapter" not in reward.stage and "quant" not in sft.stage


def test_outputs_default_to_the_project_root_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MARL_EXP_OUTPUT_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # another working directory: the same cache
    assert compose().output_dir == str(project_root() / "outputs") and project_root() == REPO
    monkeypatch.setenv("MARL_EXP_OUTPUT_DIR", str(tmp_path / "mine"))
    assert compose().output_dir == str(tmp_path / "mine")


# ----------------------------------------------------------------- a run that tells its result; sample
@pytest.fixture(scope="module")
def ppo_run(trained_chain, tmp_path_factory):
    """A 2-step PPO run through cli.main, with its console output."""
    out = tmp_path_factory.mktemp("told")
    cfg = compose("stage=ppo", "logger=none", f"output_dir={out}", f"stage.sft_model={trained_chain['sft_model']}",
                  f"stage.reward_adapter={trained_chain['reward_adapter']}", "stage.steps=2", "stage.batch_size=8",
                  "stage.optim.mini_batch_size=4", "stage.eval.eval_samples=8", "stage.sampling.max_new_tokens=8", "stage.eval.eval_every=1",
                  "stage.save_every=0")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli.main(cfg, run_dir=out / "run")
    return out / "run", stdout.getvalue(), trained_chain


def test_a_run_prints_its_plan_evaluations_and_result(ppo_run):
    run_dir, text, chain = ppo_run
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("marl-exp: stage=ppo")))
    assert lines[start + 1].startswith("  precision  fp32 weights, adapters and compute (quant=fp32)")
    assert lines[start + 2] == f"  base       {chain['sft_model']} (stage.sft_model)"
    assert [line for line in lines if line.startswith("memory: base weights ")]
    evals = [line for line in lines if line.startswith("eval ")]
    assert [line.split(":")[0] for line in evals] == ["eval before step 0/2", "eval during step 1/2",
                                                      "eval after step 2/2"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"oracle {summary['eval/after/oracle_score']:.3f}" in evals[-1]
    result = lines[lines.index(next(line for line in lines if line.startswith("marl-exp: result of the ppo stage"))):]
    assert result[2].split() == ["reward", f"{summary['eval/before/reward_score']:.3f}", "->",
                                 f"{summary['eval/after/reward_score']:.3f}"]
    assert f"adapters   {run_dir / 'policies' / 'policy'}" in text
    assert "resolved_config.yaml" in text and "stage:\n" not in text  # the config is in the run dir, not printed


def _sample(*args) -> list[dict]:
    from marl_exp import sample

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert sample.main([*args, "--json"]) == 0
    return [json.loads(line) for line in stdout.getvalue().splitlines() if line.startswith("{")]


def test_sample_shows_policy_and_reference_with_reward_kl_and_oracle(ppo_run):
    from marl_exp.data.reviews import oracle_score

    run_dir, _, _ = ppo_run
    rows = _sample(str(run_dir), "-n", "3", "--max-new-tokens", "8")
    assert [(r["role"], r["prompt"]) for r in rows][:3] == [("reference", p) for p in (r["prompt"] for r in rows[:3])]
    assert len(rows) == 6 and {r["role"] for r in rows} == {"reference", "policy"}
    for row in rows:
        assert row["oracle"] == oracle_score(row["prompt"] + row["response"])  # the task's own judge
        assert isinstance(row["reward"], float)
        assert (row["kl"] is None) == (row["role"] == "reference")


def test_sample_of_an_untrained_adapter_equals_the_reference(ppo_run, tmp_path):
    """A fresh LoRA (B = 0) is the base: same random stream, so the same texts, rewards and zero KL. Also an
    independent check of the reward: HF's classifier + peft on the same tokens gives the same score."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    _, _, chain = ppo_run
    fresh = tmp_path / "policies" / "fresh"
    get_peft_model(AutoModelForCausalLM.from_pretrained(chain["sft_model"]),
                   LoraConfig(r=4, target_modules="all-linear")).save_pretrained(fresh)
    rows = _sample(str(fresh), "--base", str(chain["sft_model"]), "--reward-adapter", str(chain["reward_adapter"]),
                   "--prompts", "the movie was", "the acting felt", "--max-new-tokens", "8")
    reference = [r for r in rows if r["role"] == "reference"]
    policy = [r for r in rows if r["role"] == "policy"]
    assert [r["response"] for r in policy] == [r["response"] for r in reference]
    assert [r["reward"] for r in policy] == pytest.approx([r["reward"] for r in reference], abs=1e-5)
    assert all(abs(r["kl"]) < 1e-4 for r in policy)

    tokenizer = AutoTokenizer.from_pretrained(chain["sft_model"])
    classifier = AutoModelForSequenceClassification.from_pretrained(chain["sft_model"], num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    reward_model = PeftModel.from_pretrained(classifier, chain["reward_adapter"]).eval()
    for row in reference:  # the sampled tokens after the prompt's, then EOS unless they end in it (RewardTrainer's input)
        eos = [] if row["response_ids"][-1:] == [tokenizer.eos_token_id] else [tokenizer.eos_token_id]
        ids = torch.tensor([tokenizer(row["prompt"]).input_ids + row["response_ids"] + eos])
        with torch.no_grad():
            expected = reward_model(input_ids=ids).logits[0, 0].item()
        assert row["reward"] == pytest.approx(expected, abs=2e-3)


def test_sample_bad_arguments_are_one_line(tmp_path, capsys):
    from marl_exp import sample

    assert sample.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"marl-exp: error: {str(tmp_path / 'nope')!r} does not exist; give a PPO run dir or a policy adapter dir"]
    assert sample.main([str(tmp_path)]) == 2
    assert "has no policies/<name>/ adapter" in capsys.readouterr().err


@pytest.mark.parametrize("recorded", [
    {"name": "grpo", "sampling": {"max_new_tokens": 9, "temperature": 0.7, "num_generations": 4}, "kl": {"beta": 0.1}},
    {"name": "ppo", "max_new_tokens": 9, "temperature": 0.7, "kl_estimator": "k3"},  # recorded before the headings
])
def test_sample_reads_the_runs_sampling_settings_nested_or_flat(recorded):
    import argparse

    from omegaconf import OmegaConf

    from marl_exp.sample import sampling_config

    args = argparse.Namespace(max_new_tokens=None, temperature=None, top_k=5, top_p=None)
    stage = sampling_config(OmegaConf.create({"stage": recorded}), args)
    assert (stage.sampling.max_new_tokens, stage.sampling.temperature, stage.sampling.top_k) == (9, 0.7, 5)
    assert stage.kl.kl_estimator == ("k3" if recorded["name"] == "ppo" else "k1")


def test_ctrl_c_that_reaches_another_thread_still_ends_the_wait_for_a_cache_lock(tmp_path, sigint_raises):
    # A terminal's Ctrl-C goes to the process; any thread may take it. A blocking flock would return only once
    # the other job released the lock (10 s here); the wait polls, so the main thread sees the signal at once.
    import fcntl

    from marl_exp.stages.pipeline import _build_lock

    target = tmp_path / "cache" / "sft-x"
    target.parent.mkdir(parents=True)
    with open(target.with_name(".sft-x.lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        release = threading.Timer(10, fcntl.flock, (held, fcntl.LOCK_UN))
        interrupt = threading.Timer(0.3, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT))
        release.start()
        interrupt.start()
        started = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt), _build_lock(target):
                pass
        finally:
            release.cancel()
        assert time.monotonic() - started < 3
