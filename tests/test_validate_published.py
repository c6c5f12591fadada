"""The published-row validation and the fit of the model's free constants
(jaxserve.bench.validate_published, jaxserve.bench.fit_published): the fit set is exactly the
named source, the held-out rows never reach the fit, the fit is a pure function of its rows,
and the profiles carry the values the command writes. No jax, no device."""

import dataclasses

import pytest

from jaxserve.bench import fit_published as fp
from jaxserve.bench import validate_published as vp
from jaxserve.perf.profiles import load_hardware

# a short search keeps the test cheap; the command runs the full one
QUICK = dict(sweeps=1, steps=4)


def test_the_fit_set_is_the_named_source_and_the_held_out_rest_is_disjoint():
    fit, held = fp.split(vp.ROWS, "NIM")
    assert [r.number for r in fit] == [17, 18, 19, 20, 21, 22]
    assert {r.source for r in fit} == {"NIM"}
    assert "NIM" not in {r.source for r in held}
    assert {r.number for r in fit}.isdisjoint(r.number for r in held)
    assert sorted(r.number for r in fit + held) == list(range(1, len(vp.ROWS) + 1))
    # the done-when of the held-out set: >= 20 rows from >= 3 sources
    assert len(held) >= 20 and len({r.source for r in held}) >= 3
    assert fp.row_span(fit) == "17-22"
    assert fp.row_span(fp.split(vp.ROWS, "TRT")[0]) == "1-16, 26-28"


def test_an_unknown_fit_source_is_named():
    with pytest.raises(ValueError, match="'nim'"):
        fp.split(vp.ROWS, "nim")


@pytest.fixture(scope="module")
def quick_fit():
    return fp.fit(fp.split(vp.ROWS)[0], **QUICK)


def test_no_held_out_row_is_predicted_during_the_fit_and_none_moves_it(quick_fit):
    fit, held = fp.split(vp.ROWS)
    seen = []

    def recording(row, profiles=None):
        seen.append(row.number)
        return vp.predict(row, profiles)

    c = fp.fit(fit, predict=recording, **QUICK)
    assert seen and set(seen) <= {r.number for r in fit}
    assert c == quick_fit  # and the same search on the same rows gives the same constants
    # a held-out row changed beyond recognition (x10) changes nothing the fit returns
    rows = [dataclasses.replace(r, published=r.published * 10) if r.source != "NIM" else r
            for r in vp.ROWS]
    assert fp.fit(fp.split(rows)[0], **QUICK) == c


def test_the_fit_lowers_the_loss_of_its_rows(quick_fit):
    fit, _ = fp.split(vp.ROWS)
    start = fp.Constants(0.5, 0.0)  # where the search starts
    assert fp.loss(fit, quick_fit) < fp.loss(fit, start)


def test_the_profiles_hold_the_values_the_command_wrote_and_say_where_from():
    """h100 / h200 / a100 carry the fitted constants, each line naming the rows and command
    (rerun the command after changing the rows or the model)."""
    h100 = load_hardware("h100")
    ratio = h100.matmul_efficiency["float8"][0][0][1] / h100.matmul_efficiency["default"][0][0][1]
    for name in fp.OVERHEAD_PROFILES:
        text = (fp.HARDWARE_DIR / f"{name}.yaml").read_text()
        line = next(l for l in text.splitlines() if l.startswith("layer_overhead_s:"))
        assert "fitted on published rows 17-22 (NIM)" in line and fp.COMMAND in line
        assert load_hardware(name).layer_overhead_s == h100.layer_overhead_s
    for name in fp.EIGHT_BIT_PROFILES:
        hw = load_hardware(name)
        for dtype in ("float8", "int8"):
            for (r, f), (_, f16) in zip(hw.matmul_efficiency[dtype][0],
                                        hw.matmul_efficiency["default"][0]):
                assert f == pytest.approx(ratio * f16, abs=1e-4)


def test_writing_the_constants_keeps_the_rest_of_the_profile(tmp_path):
    for name in ("h100", "h200", "a100-80gb"):
        (tmp_path / f"{name}.yaml").write_text((fp.HARDWARE_DIR / f"{name}.yaml").read_text())
    c = fp.Constants(float8_ratio=0.6, layer_overhead_s=5e-5)
    fit, _ = fp.split(vp.ROWS)
    fp.write_profiles(c, fit, tmp_path)
    hw, before = load_hardware(tmp_path / "h100.yaml"), load_hardware("h100")
    assert hw.layer_overhead_s == 5e-5
    assert hw.matmul_efficiency["float8"][0][-1][1] == pytest.approx(0.6 * 0.75)
    assert (hw.peak_flops, hw.sources, hw.memory_bandwidth) == (
        before.peak_flops, before.sources, before.memory_bandwidth)
    assert load_hardware(tmp_path / "a100-80gb.yaml").layer_overhead_s == 5e-5


def test_every_row_names_its_source_and_configuration():
    for r in vp.ROWS:
        assert r.model in vp.MODELS and r.kind in vp.UNITS and r.published > 0
        assert r.citation == vp.SOURCES[r.source]
    for key in ("TRT", "TRT05", "H200"):
        assert "https://" in vp.SOURCES[key]


def test_tpla_is_a_validation_row_with_its_source_and_the_mechanism_behind_it():
    """DeepSeek-V3 decode at 32K on 8 H200: TPLA's step over MLA's, beside the paper's 1.79x.
    The mechanism: each device caches 512/8 of the latent + the whole 64-dim rope key instead
    of all 576 dims, so the attention op reads 4.5x fewer bytes; the weights (671B
    parameters, the DeepSeek-V3 report's count) are read alike by both."""
    from jaxserve.perf.step import decode_chunk

    row = next(r for r in vp.ROWS if r.source == "TPLA")
    assert (row.model, row.published, row.kind, row.tp) == ("DeepSeek-V3", 1.79, "tpla", 8)
    assert "https://arxiv.org/abs/2508.15881" in row.citation and "1.79x" in row.citation
    mla = vp.deployment(row)
    tpla = vp.latent_split(mla)
    assert sum(p.size for p in mla.params.values()) == pytest.approx(671e9, rel=0.005)
    assert mla.fits and tpla.weight_bytes_per_device == pytest.approx(
        mla.weight_bytes_per_device, rel=0.01)
    assert (mla.kv_bytes_per_token, tpla.kv_bytes_per_token) == (576 * 2 * 61, 128 * 2 * 61)
    step = [decode_chunk(32768, 64)]
    attention = [next(o for o in d.step(step).ops if o.name.startswith("attention over"))
                 for d in (mla, tpla)]
    assert attention[0].bytes / attention[1].bytes == pytest.approx(4.5, rel=0.01)
    scored = vp.score([row])[0]
    assert scored["unit"] == "x" and abs(scored["error"]) <= vp.TARGET
