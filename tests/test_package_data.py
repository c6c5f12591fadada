"""The data the defaults need ships inside the package: a wheel built from the source holds every
built-in rules file, every hardware profile and every file of the embedded model, and installed
from that wheel (not from the source tree) jaxserve finds them from any directory."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jaxserve.package_data import embedded_draft, embedded_model, rules_dir
from jaxserve.rules import load_rules

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxserve"


def data_files() -> list[str]:
    """What the wheel must hold, as paths inside it."""
    files = [*(PACKAGE / "sharding_rules").glob("*.yaml"),
             *(PACKAGE / "perf" / "hardware").glob("*.yaml"),
             *(PACKAGE / "ops" / "cpu_kernels").glob("*.cc"),
             *(PACKAGE / "ops" / "cpu_kernels").glob("*.h"),
             *(p for name in ("tiny", "tiny-draft")
               for p in (PACKAGE / "checkpoints" / name).rglob("*") if p.is_file())]
    return sorted(str(p.relative_to(ROOT)) for p in files)


def test_the_package_finds_its_rules_and_embedded_model():
    assert rules_dir() == PACKAGE / "sharding_rules"
    assert embedded_model() == PACKAGE / "checkpoints" / "tiny"
    assert Path(load_rules("tp").source) == rules_dir() / "tp.yaml"
    assert {"tp", "dp", "dp_tp", "ep", "tp_ep", "dp_ep"} <= {p.stem for p in
                                                            rules_dir().glob("*.yaml")}
    assert (embedded_model() / "config.json").is_file()
    assert embedded_draft() == PACKAGE / "checkpoints" / "tiny-draft"
    assert (embedded_draft() / "config.json").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source (so no build output lands in the tree)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "jaxserve",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    (built,) = out.glob("jaxserve-*.whl")
    return built


def test_the_wheel_holds_the_rules_the_hardware_profiles_and_the_embedded_model(wheel):
    expected = data_files()
    assert len([f for f in expected if "/checkpoints/tiny/params/" in f]) >= 5
    assert len([f for f in expected if "/checkpoints/tiny-draft/params/" in f]) >= 5
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [f for f in expected if f not in names]
        assert not missing, f"{wheel.name} lacks {missing}"
        for f in expected:  # byte for byte what the source holds
            assert z.read(f) == (ROOT / f).read_bytes(), f


def test_installed_from_the_wheel_it_reads_its_data_from_the_install(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    code = ("import jaxserve, jaxserve.cli as cli; from jaxserve.rules import load_rules; "
            "from jaxserve.package_data import embedded_model; "
            "args = cli.build_parser().parse_args(['generate', '--prompt', 'x']); "
            "print(jaxserve.__file__); print(load_rules('tp').source); print(args.model); "
            "print((embedded_model() / 'params').is_dir())")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(site),
                                                         "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    package, rules, model, has_params = result.stdout.split("\n")[:4]
    assert Path(package).is_relative_to(site)
    assert Path(rules) == site / "jaxserve" / "sharding_rules" / "tp.yaml"
    assert Path(model) == site / "jaxserve" / "checkpoints" / "tiny" and has_params == "True"
