"""cryoves.io: MRC reading/validation, atomic writers, CSV / STAR / IMOD / Pyto round trips."""

from __future__ import annotations

import gzip
import os
import struct
import warnings

import mrcfile
import numpy as np
import pytest

from cryoves import VesicleTable, render_labels
from cryoves import io as cio


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _volume(shape=(6, 7, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32)


def _write_raw_mrc(path, data, voxel_size_A=15.0, **header):
    """Write with mrcfile directly (not our writer), so the reader is tested independently."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = voxel_size_A
        for k, v in header.items():
            setattr(m.header, k, v)
    return path


def _table(n=5, voxel_size=1.5, seed=1):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(5, 25, size=(n, 3))
    radii = rng.uniform(3, 6, size=n)
    t = VesicleTable.from_arrays(centers, radii, voxel_size=voxel_size,
                                 thickness=rng.uniform(1, 2, n), density=rng.normal(size=n),
                                 pvalue=rng.uniform(0, 1, n), stage=["refine"] * n)
    t["id"] = np.arange(3, 3 + n)
    if n >= 3:
        st = t["status"].copy()
        st[1] = "removed"
        t["status"] = st
        notes = t["note"].copy()
        notes[1] = 'outlier p=0.012, "quoted", comma'
        t["note"] = notes
        pv = t["pvalue"].copy()
        pv[2] = np.nan
        t["pvalue"] = pv
    return t


# ---------------------------------------------------------------------------------------------
# read_tomogram: dtypes, compression, memory map
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32])
def test_read_every_mrc_mode(tmp_path, dtype):
    rng = np.random.default_rng(3)
    if np.dtype(dtype).kind == "f":
        data = rng.normal(size=(4, 5, 6)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=(4, 5, 6), endpoint=True).astype(dtype)
    path = _write_raw_mrc(tmp_path / "t.mrc", data)
    with mrcfile.open(path) as m:
        assert m.data.dtype == dtype  # the file really is in that mode
    out, vs = cio.read_tomogram(path)
    assert out.dtype == np.float32 and out.shape == (4, 5, 6)
    np.testing.assert_array_equal(out, data.astype(np.float32))
    assert vs == pytest.approx(1.5)


def test_read_uint8_mode0_with_imod_flag(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6) * 2  # values up to 238 > 127
    path = tmp_path / "u8.mrc"
    with mrcfile.new(path) as m:
        m.set_data(data.view(np.int8))
        m.voxel_size = 20.0
    raw = bytearray(path.read_bytes())
    raw[152:160] = struct.pack("<ii", 1146047817, 1)  # IMOD stamp + 'bytes are unsigned' flag
    path.write_bytes(bytes(raw))
    out, vs = cio.read_tomogram(path)
    np.testing.assert_array_equal(out, data.astype(np.float32))
    assert out.max() == 238 and vs == pytest.approx(2.0)
    # without the flag, mode 0 is signed
    raw[152:160] = b"\0" * 8
    path.write_bytes(bytes(raw))
    out2, _ = cio.read_tomogram(path)
    np.testing.assert_array_equal(out2, data.view(np.int8).astype(np.float32))


def test_float32_is_memory_mapped_and_read_only(tmp_path):
    data = _volume()
    path = _write_raw_mrc(tmp_path / "t.mrc", data)
    out, _ = cio.read_tomogram(path)
    assert isinstance(out, np.memmap) and not out.flags.writeable
    np.testing.assert_array_equal(out, data)
    out2, _ = cio.read_tomogram(path, mmap=False)
    assert not isinstance(out2, np.memmap) and out2.flags.writeable
    np.testing.assert_array_equal(out2, data)


def test_big_endian_file(tmp_path):
    data = _volume()
    path = tmp_path / "be.mrc"
    with mrcfile.new(path) as m:
        m.set_data(data.astype(">f4"))
        m.voxel_size = 15.0
    out, _ = cio.read_tomogram(path)
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize("suffix,compression", [(".mrc.gz", "gzip"), (".mrc.bz2", "bzip2")])
def test_compressed(tmp_path, suffix, compression):
    data = _volume()
    path = tmp_path / f"t{suffix}"
    with mrcfile.new(path, compression=compression) as m:
        m.set_data(data)
        m.voxel_size = 15.0
    out, vs = cio.read_tomogram(path)
    np.testing.assert_array_equal(out, data)
    assert vs == pytest.approx(1.5)


def test_small_slabs_conversion(tmp_path, monkeypatch):
    """Chunked conversion and checks give the same answer with tiny slabs."""
    monkeypatch.setattr(cio, "_SLAB_BYTES", 100)
    data = (np.arange(5 * 6 * 7) % 251).astype(np.int16).reshape(5, 6, 7)
    path = _write_raw_mrc(tmp_path / "t.mrc", data)
    out, _ = cio.read_tomogram(path)
    np.testing.assert_array_equal(out, data.astype(np.float32))
    bad = data.astype(np.float32)
    bad[3, 2, 1] = np.nan
    path2 = _write_raw_mrc(tmp_path / "nan.mrc", bad)
    with pytest.raises(ValueError, match=r"1 of 210 voxels .* slice 3"):
        cio.read_tomogram(path2)


def test_axis_order_is_honoured(tmp_path):
    data = _volume((3, 4, 5))
    path = tmp_path / "perm.mrc"
    # store sections along X: file array is (X, Y, Z) -> mapc=Z(3), mapr=Y(2), maps=X(1)
    with mrcfile.new(path) as m:
        m.set_data(np.ascontiguousarray(data.transpose(2, 1, 0)))
        m.voxel_size = 15.0
        m.header.mapc, m.header.mapr, m.header.maps = 3, 2, 1
    out, _ = cio.read_tomogram(path)
    np.testing.assert_array_equal(out, data)


# ---------------------------------------------------------------------------------------------
# read_tomogram: bad inputs
# ---------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        cio.read_tomogram(tmp_path / "nope.mrc")


def test_not_mrc(tmp_path):
    p = tmp_path / "notes.mrc"
    p.write_text("this is not an MRC file\n" * 100)
    with pytest.raises(ValueError, match="not a readable MRC file"):
        cio.read_tomogram(p)
    p2 = tmp_path / "short.mrc"
    p2.write_bytes(b"abc")
    with pytest.raises(ValueError, match="shorter than an MRC header"):
        cio.read_tomogram(p2)
    p3 = tmp_path / "empty.mrc"
    p3.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        cio.read_tomogram(p3)


def test_truncated(tmp_path):
    path = _write_raw_mrc(tmp_path / "t.mrc", _volume((10, 10, 10)))
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        cio.read_tomogram(path)
    gz = tmp_path / "t.mrc.gz"
    gz.write_bytes(gzip.compress(raw)[:-200])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        cio.read_tomogram(gz)


def test_old_mrc_without_map_id_is_read_with_warning(tmp_path):
    data = _volume()
    path = _write_raw_mrc(tmp_path / "old.mrc", data)
    raw = bytearray(path.read_bytes())
    raw[208:212] = b"\0\0\0\0"
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="no 'MAP ' id"):
        out, _ = cio.read_tomogram(path)
    np.testing.assert_array_equal(out, data)
    # but not when the size does not match
    path.write_bytes(bytes(raw) + b"xx")
    with pytest.raises(ValueError, match="not a readable MRC"):
        cio.read_tomogram(path)


def test_zero_machine_stamp_is_read_with_warning(tmp_path):
    data = _volume()
    path = _write_raw_mrc(tmp_path / "ms.mrc", data)
    raw = bytearray(path.read_bytes())
    raw[212:216] = b"\0\0\0\0"
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="machine stamp"):
        out, vs = cio.read_tomogram(path)
    np.testing.assert_array_equal(out, data)
    assert vs == pytest.approx(1.5)


def test_unsupported_modes(tmp_path):
    path = tmp_path / "c.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((2, 3, 4), np.complex64))
        m.voxel_size = 15.0
    with pytest.raises(ValueError, match="complex"):
        cio.read_tomogram(path)
    raw = bytearray(path.read_bytes())
    raw[12:16] = struct.pack("<i", 3)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="mode 3 is not supported"):
        cio.read_tomogram(path)


def test_2d_and_4d_rejected(tmp_path):
    p2 = _write_raw_mrc(tmp_path / "img.mrc", _volume((1, 8, 9))[0])
    with pytest.raises(ValueError, match="2-D image"):
        cio.read_tomogram(p2)
    p4 = tmp_path / "stack.mrc"
    with mrcfile.new(p4) as m:
        m.set_data(np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32))
        m.voxel_size = 15.0
    with pytest.raises(ValueError, match="stack of 2 volumes"):
        cio.read_tomogram(p4)


def test_image_stack_named_mrcs_warns_but_reads(tmp_path):
    data = _volume()
    p = tmp_path / "t.mrcs"
    with mrcfile.new(p) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 15.0
    with pytest.warns(UserWarning, match="stack of 2-D images"):
        out, _ = cio.read_tomogram(p)
    np.testing.assert_array_equal(out, data)
    # an IMOD-style tomogram (space group 0) named .rec reads silently
    p2 = tmp_path / "t.rec"
    with mrcfile.new(p2) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 15.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cio.read_tomogram(p2)


@pytest.mark.parametrize("value,count", [(np.nan, 3), (np.inf, 2), (-np.inf, 1)])
def test_nan_inf_rejected(tmp_path, value, count):
    data = _volume()
    flat = data.reshape(-1)
    flat[[100, 200, 300][:count]] = value
    p = _write_raw_mrc(tmp_path / "bad.mrc", data)
    first_z = 100 // (7 * 8)
    with pytest.raises(ValueError, match=rf"{count} of {data.size} voxels are NaN or infinite \(first in Z slice {first_z}"):
        cio.read_tomogram(p)
    out, _ = cio.read_tomogram(p, check=False)
    assert np.isnan(out).sum() + np.isinf(out).sum() == count


def test_constant_volume_rejected(tmp_path):
    p = _write_raw_mrc(tmp_path / "c.mrc", np.full((4, 5, 6), 7, np.int16))
    with pytest.raises(ValueError, match="same value"):
        cio.read_tomogram(p)


@pytest.mark.parametrize("voxel_A", [0.0, 1.0, 0.018, 60.0])
def test_missing_or_implausible_voxel_size(tmp_path, voxel_A):
    data = _volume()
    p = _write_raw_mrc(tmp_path / "v.mrc", data, voxel_size_A=voxel_A)
    with pytest.raises(ValueError, match="--voxel-size") as info:
        cio.read_tomogram(p)
    assert ("no voxel size" in str(info.value)) == (voxel_A == 0)
    out, vs = cio.read_tomogram(p, voxel_size=1.2)  # an explicit value fixes it
    assert vs == 1.2
    np.testing.assert_array_equal(out, data)


def test_voxel_size_from_header_alone(tmp_path):
    p = _write_raw_mrc(tmp_path / "v.mrc", _volume(), voxel_size_A=13.48)
    assert cio.voxel_size_from_header(p) == pytest.approx(1.348)
    assert cio.voxel_size_from_header(cio.read_mrc_header(p), 1.35) == 1.35
    p0 = _write_raw_mrc(tmp_path / "v0.mrc", _volume(), voxel_size_A=0.0)
    with pytest.raises(ValueError, match="--voxel-size"):
        cio.voxel_size_from_header(p0)


def test_explicit_voxel_size_overrides_with_warning(tmp_path):
    p = _write_raw_mrc(tmp_path / "v.mrc", _volume(), voxel_size_A=15.0)
    with pytest.warns(UserWarning, match="header says"):
        _, vs = cio.read_tomogram(p, voxel_size=2.0)
    assert vs == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, vs = cio.read_tomogram(p, voxel_size=1.505)  # within 1 %: silent
    assert vs == 1.505


@pytest.mark.parametrize("bad", [0, -1, float("nan"), 22.0, 0.01])
def test_explicit_voxel_size_validated(tmp_path, bad):
    p = _write_raw_mrc(tmp_path / "v.mrc", _volume(), voxel_size_A=15.0)
    with pytest.raises(ValueError) as info:
        cio.read_tomogram(p, voxel_size=bad)
    if bad == 22.0:
        assert "Did you give Å" in str(info.value) and "2.2 nm" in str(info.value)


def test_anisotropic_header(tmp_path):
    p = tmp_path / "a.mrc"
    with mrcfile.new(p) as m:
        m.set_data(_volume())
        m.voxel_size = (15.0, 15.0, 30.0)
    with pytest.raises(ValueError, match="anisotropic"):
        cio.read_tomogram(p)
    with pytest.warns(UserWarning):
        _, vs = cio.read_tomogram(p, voxel_size=1.5)
    assert vs == 1.5


# ---------------------------------------------------------------------------------------------
# writers: MRC, atomicity, overwrite, protection
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,expect", [(np.float32, np.float32), (np.float64, np.float32),
                                          (np.float16, np.float16), (np.int8, np.int8),
                                          (np.int16, np.int16), (np.uint16, np.uint16),
                                          (np.uint8, np.uint16), (np.int64, np.uint16)])
def test_write_mrc_round_trip(tmp_path, dtype, expect):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(4, 5, 6)) * 50 if np.dtype(dtype).kind == "f"
            else rng.integers(0, 120, size=(4, 5, 6))).astype(dtype)
    p = cio.write_mrc(tmp_path / "w.mrc", data, 1.25)
    with mrcfile.open(p) as m:
        assert m.data.dtype == expect
        np.testing.assert_array_equal(m.data, data.astype(expect))
        assert float(m.voxel_size.x) == pytest.approx(12.5) and float(m.voxel_size.z) == pytest.approx(12.5)
        assert m.header.dmax == pytest.approx(float(data.astype(expect).max()), rel=1e-3)
        assert m.is_volume()
    out, vs = cio.read_tomogram(p)
    assert vs == pytest.approx(1.25)
    np.testing.assert_allclose(out, data.astype(expect).astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.int32])
@pytest.mark.parametrize("fill", [0.0, 0.1, 1.0])
def test_write_mrc_header_statistics_of_integers(tmp_path, dtype, fill):
    # integer volumes (labels, mostly 0) get their statistics from the non-zero voxels only
    rng = np.random.default_rng(1)
    lo = -100 if np.dtype(dtype).kind == "i" else 1
    data = np.where(rng.random((20, 9, 7)) < fill, rng.integers(lo, 120, size=(20, 9, 7)), 0).astype(dtype)
    data[data == 0] = 0 if fill < 1 else 5
    p = cio.write_mrc(tmp_path / "s.mrc", data, 1.0)
    d = data.astype(np.float64)
    with mrcfile.open(p) as m:
        assert (float(m.header.dmin), float(m.header.dmax)) == (d.min(), d.max())
        assert float(m.header.dmean) == pytest.approx(d.mean(), rel=1e-6, abs=1e-9)
        assert float(m.header.rms) == pytest.approx(d.std(), rel=1e-5, abs=1e-9)


def test_write_mrc_gz(tmp_path):
    data = _volume()
    p = cio.write_mrc(tmp_path / "w.mrc.gz", data, 1.5)
    assert p.read_bytes()[:2] == b"\x1f\x8b"
    out, _ = cio.read_tomogram(p)
    np.testing.assert_array_equal(out, data)


def test_write_mrc_rejects_bad_data(tmp_path):
    with pytest.raises(ValueError, match="3-D"):
        cio.write_mrc(tmp_path / "x.mrc", np.zeros((3, 4)), 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        cio.write_mrc(tmp_path / "x.mrc", np.full((2, 2, 2), 70000, np.int64), 1.0)
    with pytest.raises(ValueError, match="positive"):
        cio.write_mrc(tmp_path / "x.mrc", np.zeros((2, 2, 2), np.float32), 0)
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_refuses_to_overwrite(tmp_path):
    p = tmp_path / "w.mrc"
    cio.write_mrc(p, _volume(), 1.5)
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        cio.write_mrc(p, _volume(seed=5), 1.5)
    assert p.read_bytes() == before
    cio.write_mrc(p, _volume(seed=5), 1.5, overwrite=True)
    assert p.read_bytes() != before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["w.mrc"]  # no temporary files


@pytest.mark.parametrize("writer", ["mrc", "csv", "star", "mod"])
def test_every_writer_refuses_to_overwrite(tmp_path, writer):
    t = _table()
    p = tmp_path / f"out.{writer}"
    p.write_text("precious")
    call = {"mrc": lambda ow: cio.write_mrc(p, _volume(), 1.5, overwrite=ow),
            "csv": lambda ow: cio.write_vesicles_csv(p, t, overwrite=ow),
            "star": lambda ow: cio.write_star(p, t, overwrite=ow),
            "mod": lambda ow: cio.write_imod_model(p, t, (30, 30, 30), overwrite=ow)}[writer]
    with pytest.raises(FileExistsError):
        call(False)
    assert p.read_text() == "precious"
    call(True)
    assert p.read_bytes() != b"precious"


def test_never_overwrites_an_input_even_with_overwrite(tmp_path):
    data = _volume()
    p = _write_raw_mrc(tmp_path / "input.mrc", data)
    before = (p.read_bytes(), os.stat(p).st_mtime_ns)
    tomo, vs = cio.read_tomogram(p)
    with pytest.raises(PermissionError, match="input file"):
        cio.write_mrc(p, tomo * 2, vs, overwrite=True)
    link = tmp_path / "link.mrc"
    os.link(p, link)
    with pytest.raises(PermissionError):
        cio.write_vesicles_csv(link, _table(), overwrite=True)
    sym = tmp_path / "sym.mrc"
    sym.symlink_to(p)
    with pytest.raises(PermissionError):
        cio.write_labels_mrc(sym, np.zeros((6, 7, 8), np.uint16), vs, overwrite=True)
    assert (p.read_bytes(), os.stat(p).st_mtime_ns) == before
    np.testing.assert_array_equal(tomo, data)


def test_write_into_missing_or_unwritable_folder(tmp_path, unwritable_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cio.write_mrc(tmp_path / "nope" / "x.mrc", _volume(), 1.5)
    with pytest.raises(PermissionError, match="cannot write"):
        cio.write_vesicles_csv(unwritable_dir / "x.csv", _table())
    with pytest.raises(PermissionError, match="cannot write"):
        cio.check_output_dir(unwritable_dir)
    with pytest.raises(PermissionError, match="cannot create"):
        cio.check_output_dir(unwritable_dir / "sub")


def test_check_output_dir(tmp_path):
    d = cio.check_output_dir(tmp_path / "a" / "b")
    assert d.is_dir() and not list(d.iterdir())
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        cio.check_output_dir(f)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "x.csv"

    class Boom(Exception):
        pass

    def bad_fmt(v):
        raise Boom()

    monkeypatch.setattr(cio, "_fmt", bad_fmt)
    with pytest.raises(Boom):
        cio.write_vesicles_csv(p, _table())
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# labels / Pyto
# ---------------------------------------------------------------------------------------------
def test_labels_mrc_round_trip(tmp_path):
    t = _table(n=6)
    labels = render_labels(t, (30, 31, 32))
    p = cio.write_labels_mrc(tmp_path / "l.mrc", labels, 1.5)
    with mrcfile.open(p) as m:
        assert m.header.mode == 6 and m.data.dtype == np.uint16
    back, vs = cio.read_labels(p)
    np.testing.assert_array_equal(back, labels)
    assert vs == pytest.approx(1.5)
    assert set(np.unique(back)) - {0} == set(t.accepted().ids.tolist())
    with pytest.raises(ValueError, match="65535"):
        cio.write_labels_mrc(tmp_path / "big.mrc", np.full((2, 2, 2), 70000), 1.5)
    with pytest.raises(ValueError, match="65535"):
        cio.write_labels_mrc(tmp_path / "neg.mrc", np.full((2, 2, 2), -1), 1.5)
    with pytest.raises(TypeError):
        cio.write_labels_mrc(tmp_path / "f.mrc", np.zeros((2, 2, 2), np.float32), 1.5)
    with pytest.raises(ValueError, match="shape"):
        cio.read_labels(p, check_shape=(1, 2, 3))


def test_pyto_labels(tmp_path):
    shape = (30, 31, 32)
    t = _table(n=6)
    mask = np.zeros(shape, bool)
    mask[2:28, 2:29, 2:30] = True
    az = np.zeros(shape, bool)
    az[2:28, 2:29, 2] = True
    p = cio.write_pyto_labels(tmp_path / "pyto.mrc", t, shape, mask=mask, active_zone=az)
    out, vs = cio.read_labels(p)
    assert vs == pytest.approx(1.5) and out.dtype == np.uint16
    acc = t.accepted()
    expected_ves = render_labels(acc, shape, ids=np.arange(10, 10 + len(acc)))
    assert set(np.unique(out)) == {0, 1, 2} | set(range(10, 10 + len(acc)))
    np.testing.assert_array_equal(out[expected_ves > 0], expected_ves[expected_ves > 0])
    rest = expected_ves == 0
    np.testing.assert_array_equal(out[rest & az], 2)
    np.testing.assert_array_equal(out[rest & mask & ~az], 1)
    np.testing.assert_array_equal(out[rest & ~mask], 0)
    # vesicle k (table order of accepted rows) is label 10 + k
    for k in range(len(acc)):
        c = np.round(acc.centers[k]).astype(int)
        assert out[tuple(c)] == 10 + k
    with pytest.raises(ValueError, match="shape"):
        cio.write_pyto_labels(tmp_path / "p2.mrc", t, shape, mask=mask[:-1])


def test_pyto_labels_from_the_label_volume_equal_the_drawn_ones(tmp_path):
    # 12 spheres in a small volume: many overlap (the split between them must be the same), one
    # row removed, ids not contiguous
    shape = (30, 31, 32)
    t = _table(n=12, seed=4)
    t["id"] = np.arange(3, 3 + 12) * 7
    mask = np.zeros(shape, bool)
    mask[2:28, 2:29, 2:30] = True
    labels = render_labels(t, shape)
    drawn = cio.write_pyto_labels(tmp_path / "drawn.mrc", t, shape, mask=mask)
    renum = cio.write_pyto_labels(tmp_path / "renum.mrc", t, shape, mask=mask, labels=labels)
    a, _ = cio.read_labels(drawn)
    b, _ = cio.read_labels(renum)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) > 8  # the spheres are there
    # a volume that is not this table's rendering is refused, nothing written
    removed_id = int(t.ids[1])
    bad = labels.copy()
    bad[0, 0, 0] = removed_id
    with pytest.raises(ValueError, match=f"{removed_id}.*no accepted"):
        cio.write_pyto_labels(tmp_path / "bad.mrc", t, shape, labels=bad)
    bad[0, 0, 0] = 10_000
    with pytest.raises(ValueError, match="10000"):
        cio.write_pyto_labels(tmp_path / "bad.mrc", t, shape, labels=bad)
    with pytest.raises(ValueError, match="shape"):
        cio.write_pyto_labels(tmp_path / "bad.mrc", t, shape, labels=labels[:-1])
    assert not (tmp_path / "bad.mrc").exists()


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------
def test_csv_round_trip_exact(tmp_path):
    t = _table(n=7)
    t["x"] = t["x"] + 1e-13  # digits that a %.6g format would lose
    p = cio.write_vesicles_csv(tmp_path / "v.csv", t)
    header = p.read_text().splitlines()[0].split(",")
    assert header == ["id", "z", "y", "x", "radius", "thickness", "density", "pvalue", "stage", "status",
                      "note", "reviewed", "z_nm", "y_nm", "x_nm", "radius_nm", "thickness_nm", "voxel_size_nm"]
    back = cio.read_vesicles_csv(p)
    assert back == t
    assert back["note"][1] == t["note"][1] and np.isnan(back["pvalue"][2])
    assert back.voxel_size == 1.5


def test_csv_empty_and_without_voxel_size(tmp_path):
    empty = VesicleTable.empty(voxel_size=1.5)
    p = cio.write_vesicles_csv(tmp_path / "e.csv", empty)
    back = cio.read_vesicles_csv(p, voxel_size=1.5)
    assert len(back) == 0 and back.voxel_size == 1.5
    t = _table(voxel_size=None)
    p2 = cio.write_vesicles_csv(tmp_path / "n.csv", t)
    assert "x_nm" not in p2.read_text().splitlines()[0]
    assert cio.read_vesicles_csv(p2) == t


def test_csv_nm_only_and_inconsistent(tmp_path):
    p = tmp_path / "nm.csv"
    p.write_text("z_nm,y_nm,x_nm,radius_nm\n15,30,45,20\n")
    with pytest.raises(ValueError, match="voxel_size"):
        cio.read_vesicles_csv(p)
    t = cio.read_vesicles_csv(p, voxel_size=1.5)
    np.testing.assert_allclose(t.centers[0], [10, 20, 30])
    assert t.radii[0] == pytest.approx(20 / 1.5)
    t2 = _table()
    p2 = cio.write_vesicles_csv(tmp_path / "v.csv", t2)
    lines = p2.read_text().splitlines()
    head = lines[0].split(",")
    row = lines[1].split(",")
    row[head.index("x_nm")] = "999"
    p2.write_text("\n".join([lines[0], ",".join(row)] + lines[2:]) + "\n")
    with pytest.warns(UserWarning, match="x_nm disagrees"):
        back = cio.read_vesicles_csv(p2)
    assert back["x"][0] == t2["x"][0]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,z\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        cio.read_vesicles_csv(bad)


# ---------------------------------------------------------------------------------------------
# STAR
# ---------------------------------------------------------------------------------------------
def test_star_round_trip(tmp_path):
    t = _table(n=6)
    p = cio.write_star(tmp_path / "v.star", t, tomo_name="TS_01 tomo")
    text = p.read_text()
    assert "data_particles" in text and "loop_" in text
    labels = [ln.split()[0] for ln in text.splitlines() if ln.startswith("_")]
    assert labels == ["_rlnTomoName", "_rlnCoordinateX", "_rlnCoordinateY", "_rlnCoordinateZ",
                      "_cryovesId", "_cryovesRadiusNm", "_cryovesPValue", "_cryovesVoxelSizeNm"]
    back = cio.read_star(p)
    acc = t.accepted()
    assert len(back) == len(acc)
    np.testing.assert_array_equal(back.ids, acc.ids)
    np.testing.assert_array_equal(back.centers, acc.centers)  # exact: repr precision
    np.testing.assert_allclose(back.radii, acc.radii, rtol=1e-14)
    np.testing.assert_array_equal(back["pvalue"], acc["pvalue"])
    assert back.voxel_size == 1.5
    # X Y Z order: the first data row starts with the quoted name then x
    first = [ln for ln in text.splitlines() if ln.startswith('"TS_01 tomo"')][0]
    assert float(first.split()[2]) == acc["x"][0]
    assert len(cio.read_star(p, tomo_name="other")) == 0
    all_rows = cio.read_star(cio.write_star(tmp_path / "all.star", t, accepted_only=False))
    assert len(all_rows) == len(t)


def test_star_foreign_file(tmp_path):
    p = tmp_path / "relion.star"
    p.write_text("""
# RELION-style file with an optics block first
data_optics

loop_
_rlnOpticsGroup #1
_rlnImagePixelSize #2
1 13.48

data_particles

loop_
_rlnTomoName #1
_rlnCoordinateX #2
_rlnCoordinateY #3
_rlnCoordinateZ #4
_rlnAngleRot #5
TS_1 10.0 20.0 30.0 0.0
TS_2 11.5 21.5 31.5 0.0
""")
    t = cio.read_star(p)
    np.testing.assert_array_equal(t.centers, [[30, 20, 10], [31.5, 21.5, 11.5]])
    assert np.all(np.isnan(t.radii)) and t.voxel_size is None
    assert len(cio.read_star(p, tomo_name="TS_2")) == 1
    bad = tmp_path / "bad.star"
    bad.write_text("data_x\nloop_\n_a #1\n1\n")
    with pytest.raises(ValueError, match="_rlnCoordinateX"):
        cio.read_star(bad)


# ---------------------------------------------------------------------------------------------
# IMOD model
# ---------------------------------------------------------------------------------------------
def test_imod_model_round_trip(tmp_path):
    t = _table(n=6)
    # float32-exact values, since IMOD stores points and sizes as float32
    for name in ("z", "y", "x", "radius"):
        t[name] = np.round(t[name] * 8) / 8
    p = cio.write_imod_model(tmp_path / "v.mod", t, (30, 31, 32))
    raw = p.read_bytes()
    assert raw[:8] == b"IMODV1.2" and raw[-4:] == b"IEOF"
    assert raw[240:244] == b"OBJT"  # 8-byte id + 232-byte model header
    back, shape = cio.read_imod_model(p, return_shape=True)
    acc = t.accepted()
    assert shape == (30, 31, 32)
    np.testing.assert_array_equal(back.ids, acc.ids)
    np.testing.assert_array_equal(back.centers, acc.centers)
    np.testing.assert_array_equal(back.radii, acc.radii)
    assert back.voxel_size == 1.5
    # header fields as IMOD reads them
    hdr = struct.unpack(">128s4iI4i6f3i2if2i3f", raw[8:240])
    assert hdr[1:5] == (32, 31, 30, 1)                      # xmax, ymax, zmax, objsize
    assert hdr[21] == pytest.approx(1.5) and hdr[22] == -9  # pixsize, units = nm
    obj = struct.unpack(">64s16I2iIi3fi8B2i", raw[244:420])
    assert obj[17] == len(acc)                              # contsize
    assert obj[18] & (1 << 9) and obj[18] & (1 << 3)        # scattered points (+ open)
    # the first contour: 1 point at (x+0.5, y+0.5, z), surface = vesicle id, SIZE = radius
    assert raw[420:424] == b"CONT"
    psize, flags, time, surf = struct.unpack(">iIii", raw[424:440])
    assert (psize, surf) == (1, acc.ids[0])
    xyz = struct.unpack(">3f", raw[440:452])
    assert xyz == (acc["x"][0] + 0.5, acc["y"][0] + 0.5, acc["z"][0])
    assert raw[452:456] == b"SIZE" and struct.unpack(">if", raw[456:464]) == (4, acc.radii[0])


def test_imod_model_reader_skips_unknown_chunks_and_detects_garbage(tmp_path):
    t = _table(n=4)
    p = cio.write_imod_model(tmp_path / "v.mod", t, (30, 30, 30))
    raw = p.read_bytes()
    extra = b"MINX" + struct.pack(">i", 72) + b"\0" * 72
    p2 = tmp_path / "v2.mod"
    p2.write_bytes(raw[:-4] + extra + b"IEOF")
    assert len(cio.read_imod_model(p2)) == len(t.accepted())
    p3 = tmp_path / "trunc.mod"
    p3.write_bytes(raw[:-30])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        cio.read_imod_model(p3)
    p4 = tmp_path / "x.mod"
    p4.write_bytes(b"hello world" * 30)
    with pytest.raises(ValueError, match="not an IMOD"):
        cio.read_imod_model(p4)
    e = cio.read_imod_model(cio.write_imod_model(tmp_path / "e.mod", VesicleTable.empty(1.5), (5, 5, 5)))
    assert len(e) == 0 and e.voxel_size == 1.5


def test_conversion_memory_is_bounded(tmp_path, monkeypatch):
    """Converting a non-float32 file costs the float32 result plus about one slab, not more."""
    import tracemalloc

    monkeypatch.setattr(cio, "_SLAB_BYTES", 64 * 1024)
    data = (np.arange(64 * 96 * 96) % 1000).astype(np.int16).reshape(64, 96, 96)
    path = _write_raw_mrc(tmp_path / "big.mrc", data)
    del data
    out_bytes = 64 * 96 * 96 * 4
    tracemalloc.start()
    try:
        out, _ = cio.read_tomogram(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32 and out.shape == (64, 96, 96)
    assert peak < out_bytes + 4 * 64 * 1024 + 200_000, peak - out_bytes


def test_atomic_writers_are_public_and_safe(tmp_path):
    p = tmp_path / "r.json"
    assert cio.atomic_write_text(p, "a\nb\n") == p and p.read_bytes() == b"a\nb\n"
    with pytest.raises(FileExistsError, match="overwrite"):
        cio.atomic_write_text(p, "x")
    cio.atomic_write_bytes(p, b"\x00\x01", overwrite=True)
    assert p.read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError):
        with cio.atomic_path(tmp_path / "never", overwrite=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["r.json"]  # no half file, no temporary


def test_write_failure_names_the_file(tmp_path):
    """'[Errno 27] File too large' alone names no file: the writers add it (file-size limit in a subprocess)."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, numpy as np; from cryoves import io\n"
            "try:\n"
            "    io.write_mrc(sys.argv[1], np.zeros((20, 100, 100), np.float32), 2.0)\n"
            "except OSError as err:\n"
            "    print(err); sys.exit(3)\n")
    target = tmp_path / "big.mrc"
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src")),
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)))
    assert r.returncode == 3, r.stderr
    assert f"cannot write {target}: File too large" in r.stdout and "ulimit -f" in r.stdout
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_read_tomogram_of_an_array_says_it_wants_a_path():
    with pytest.raises(TypeError, match="wants the path of an MRC file, got a numpy array.*cryoves.segment"):
        cio.read_tomogram(np.zeros((3, 3, 3), np.float32))
    with pytest.raises(TypeError, match="read_labels\\(\\) wants the path"):
        cio.read_labels(42)


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_release_pages_drops_a_maps_resident_pages(tmp_path):
    from cryoves.io import release_pages

    path = tmp_path / "t.raw"
    np.ones((64, 512, 512), np.float32).tofile(path)  # 64 MiB
    shared = np.memmap(path, dtype=np.float32, mode="r", shape=(64, 512, 512))
    before = _rss_mb()
    assert float(shared.sum(dtype=np.float64)) == 64 * 512 * 512  # every page read
    touched = _rss_mb()
    release_pages(shared[3:5])  # a view: its whole map is released
    after = _rss_mb()
    assert touched - before > 48 and touched - after > 48, (before, touched, after)
    assert shared[3, 5, 7] == 1.0  # still readable


def test_release_pages_leaves_private_maps_alone(tmp_path):
    from cryoves.io import release_pages

    path = tmp_path / "t.raw"
    np.arange(4096, dtype=np.float32).tofile(path)
    cow = np.memmap(path, dtype=np.float32, mode="c", shape=(4096,))
    cow[:10] = -1  # private changes must survive
    release_pages(cow[2:])
    assert np.all(cow[:10] == -1)
    release_pages(np.zeros(3))  # not a map: nothing happens
