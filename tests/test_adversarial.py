"""An adversarial pass over the inputs a user controls: every option value and every manifest field
either works or gets a one-line CntinitError — never a traceback, never a non-finite output — and
a write killed at any instant leaves the old or the new output."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cntinit import CntinitError, Solution, Store, export, solve

from conftest import leftovers

SETTINGS = settings(max_examples=int(os.environ.get("ADVERSARIAL_EXAMPLES", 40)),  # raise it for a deeper pass
                    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 5e-324, 1e-310, 1e308, -1.0, 1.0]))


def finite_factors(path) -> bool:
    return all(bool(torch.isfinite(b).all() and torch.isfinite(a).all()) for b, a in Solution(path).factors().values())


@SETTINGS
@given(shift_c=FLOATS, rcond=FLOATS, split_p=FLOATS, weights=st.lists(FLOATS, min_size=3, max_size=3))
def test_cnt_float_options(captured, tmp_path_factory, shift_c, rcond, split_p, weights):
    out = tmp_path_factory.mktemp("s") / "s"
    try:
        solve(captured["llama"], out, mode="cnt-sh", rank=2, shift_c=shift_c, rcond=rcond, split_p=split_p, bucket_weights=weights)
    except CntinitError:
        return
    assert finite_factors(out)


@SETTINGS
@given(rho=FLOATS)
def test_eva_rho(captured, tmp_path_factory, rho):
    out = tmp_path_factory.mktemp("s") / "s"
    try:
        solve(captured["llama"], out, mode="eva", rank=2, rho=rho)
    except CntinitError:
        return
    assert finite_factors(out)


@pytest.fixture(scope="module")
def solved(captured, tmp_path_factory):
    return solve(captured["llama"], tmp_path_factory.mktemp("solved") / "s", mode="cnt-s", rank=2)


@SETTINGS
@given(alpha=FLOATS, rslora=st.booleans())
def test_export_alpha(solved, tmp_path_factory, alpha, rslora):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("e") / "e"
    try:
        export(solved, out, alpha=alpha, rslora=rslora)
    except CntinitError:
        return
    assert all(bool(torch.isfinite(t).all()) for t in load_file(out / "adapter_model.safetensors").values())


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), FLOATS, st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)


def paths_of(value, prefix=()):
    """Every path into a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths_of(item, prefix + (index,))


@SETTINGS
@given(data=st.data())
@pytest.mark.parametrize("kind", ["store", "solve"])
def test_manifest_fields(kind, captured, solved, tmp_path_factory, data):
    """Any one field replaced or removed: the readers refuse it in one line or work as before."""
    source = captured["llama"] if kind == "store" else solved
    directory = shutil.copytree(source, tmp_path_factory.mktemp(kind) / kind)
    manifest = json.loads((directory / "manifest.json").read_text())
    path = data.draw(st.sampled_from([p for p in paths_of(manifest) if p]))
    parent = manifest
    for part in path[:-1]:
        parent = parent[part]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    try:
        if kind == "store":
            Store(directory)
            solve(directory, tmp_path_factory.mktemp("out") / "s", mode="cnt-s", rank=2)
        else:
            Solution(directory).factors()
            export(directory, tmp_path_factory.mktemp("out") / "e")
    except CntinitError as exc:
        assert "\n" not in str(exc)


KILLED_SOLVE = """
import sys
from cntinit import cli
cli.main(sys.argv[1:])
"""


def test_kills_at_random_instants_leave_the_old_or_the_new_output(captured, tmp_path, capsys):
    """SIGKILL at random moments of writing over an existing solve directory: what is at --out is
    always a whole solve directory (the old or the new), and the next write cleans up."""
    from conftest import run

    out = tmp_path / "s"
    base = ["solve", str(captured["llama"]), "-m", "cnt-s", "-q", "-o", str(out)]
    assert run(capsys, *base, "-r", "2")[0] == 0
    started = time.perf_counter()
    assert subprocess.run([sys.executable, "-m", "cntinit", *base, "-r", "3"], capture_output=True).returncode == 0
    duration = time.perf_counter() - started
    rng = random.Random(0)
    for attempt in range(6):
        job = subprocess.Popen([sys.executable, "-m", "cntinit", *base, "-r", str(2 + attempt % 2)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 1.0) * duration)
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert Solution(out).manifest["params"]["rank"] in (2, 3)  # whole, verified, old or new
    assert run(capsys, *base, "-r", "4")[0] == 0 and Solution(out).manifest["params"]["rank"] == 4
    assert leftovers(tmp_path) == []
