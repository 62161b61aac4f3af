"""Backend registry: built-ins, "module:Class" names, entry-point plugins, auto selection."""

from __future__ import annotations

import sys
import textwrap

import pytest

from conftest import assert_user_error, run_cli
from moeport.backends import registry
from moeport.backends.cpu import CPUBackend
from moeport.backends.generic import GenericBackend
from moeport.base.errors import UserError


def test_builtins_resolve():
    assert registry.resolve_class("cpu") is CPUBackend
    assert registry.resolve_class("generic") is GenericBackend
    assert registry.resolve_class("moeport.backends.cpu:CPUBackend") is CPUBackend


def test_unknown_name_lists_available():
    with pytest.raises(UserError) as info:
        registry.resolve_class("quantum")
    for name in ("auto", "cpu", "cuda", "generic", "rocm"):
        assert name in str(info.value)


def test_auto_picks_cpu_here_and_says_why_not_the_others():
    selection = registry.select("auto")
    assert selection.backend.name == "cpu"
    assert "auto" in selection.reason
    assert "no CUDA device" in selection.rejected["cuda"]
    assert "no accelerator" in selection.rejected["generic"]


def test_generic_with_cpu_device_type():
    selection = registry.select("generic", device_type="cpu")
    assert selection.backend.device_type == "cpu"
    assert selection.backend.default_collectives == "gloo"


PLUGIN = '''
from moeport.backends.generic import GenericBackend

class AcmeBackend(GenericBackend):
    name = "acme"
    device_type = "cpu"
    default_collectives = "gloo"
'''

BROKEN_PLUGIN = "import acme_vendor_runtime_that_is_not_installed\n"


def _make_plugin_dist(root, package: str, source: str, entry_name: str) -> None:
    """An installed distribution in `root` (a sys.path entry) with one `moeport.backends` entry point."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(source)
    dist_info = root / f"{package}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[moeport.backends]\n{entry_name} = {package}:AcmeBackend\n")


def test_out_of_tree_plugin_selected_through_profile(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _make_plugin_dist(site, "acme_moeport", PLUGIN, "acme")
    profile = tmp_path / "acme.yaml"
    profile.write_text("backend: acme\nparallel: {world_size: 1}\n")
    env = {"PYTHONPATH": str(site)}
    result = run_cli("info", "--profile", str(profile), "--json", env=env)
    assert result.returncode == 0, result.stderr
    import json

    info = json.loads(result.stdout)
    assert info["backend"] == "acme"
    assert info["class"] == "acme_moeport:AcmeBackend"
    assert info["default_collectives"] == "gloo"
    # auto tries plugins before generic and cpu
    auto = tmp_path / "auto.yaml"
    auto.write_text("backend: auto\nparallel: {world_size: 1}\n")
    info = json.loads(run_cli("info", "--profile", str(auto), "--json", env=env).stdout)
    assert info["backend"] == "acme" and "cuda" in info["not_chosen"]


def test_plugin_runs_multi_rank(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _make_plugin_dist(site, "acme_moeport", PLUGIN, "acme")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent('''
        import sys, torch
        from moeport.testing import run_ranks
        from moeport.profile import load_profile

        def total(rt):
            t = torch.tensor([rt.rank + 1.0])
            rt.comm.all_reduce(t)
            return rt.backend.name, t.item()

        if __name__ == "__main__":
            profile = load_profile("cpu-gloo").replace(backend="acme")
            print(run_ranks(total, 2, profile, timeout_s=60))
    '''))
    import os
    import subprocess

    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{tmp_path}"},
    )
    assert result.returncode == 0, result.stderr
    assert "[('acme', 3.0), ('acme', 3.0)]" in result.stdout


def test_plugin_that_fails_to_import_names_itself(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _make_plugin_dist(site, "broken_moeport", BROKEN_PLUGIN, "brokenchip")
    profile = tmp_path / "b.yaml"
    profile.write_text("backend: brokenchip\n")
    result = run_cli("info", "--profile", str(profile), env={"PYTHONPATH": str(site)})
    assert_user_error(result, "brokenchip", "broken_moeport:AcmeBackend", "acme_vendor_runtime_that_is_not_installed")
