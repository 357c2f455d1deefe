import mlx.core as mx
import numpy as np

from mlx_specstream.cache import KVCache


def _rows(start, n, h=2, d=3):
    # Row i holds the value start+i everywhere, so moves are easy to read.
    v = mx.arange(start, start + n, dtype=mx.float32)[None, None, :, None]
    return mx.broadcast_to(v, (1, h, n, d))


def test_update_fetch_and_growth_past_step():
    c = KVCache()
    c.step = 4
    for i in range(0, 10, 3):
        k, v = c.update_and_fetch(_rows(i, 3), _rows(100 + i, 3))
    assert c.offset == 12 and k.shape[2] == 12
    np.testing.assert_array_equal(np.array(k[0, 0, :, 0]), np.arange(12))
    np.testing.assert_array_equal(np.array(v[0, 1, :, 2]), 100 + np.arange(12))


def test_reserve_preallocates_once():
    c = KVCache()
    c.reserve(1000)
    c.update_and_fetch(_rows(0, 5), _rows(0, 5))
    buf = c.keys
    assert buf.shape[2] >= 1000
    for i in range(5, 300):
        c.update_and_fetch(_rows(i, 1), _rows(i, 1))
    assert c.keys is buf


def test_trim():
    c = KVCache()
    c.update_and_fetch(_rows(0, 8), _rows(0, 8))
    assert c.trim(3) == 3 and c.offset == 5
    assert c.trim(100) == 5 and c.offset == 0
    k, _ = c.update_and_fetch(_rows(50, 2), _rows(50, 2))
    np.testing.assert_array_equal(np.array(k[0, 0, :, 0]), [50, 51])


def test_compact_gathers_selected_rows():
    """Prefix 0..9, a 5-node tree written at rows 10..14; keep nodes [0, 2, 4]."""
    c = KVCache()
    c.update_and_fetch(_rows(0, 10), _rows(0, 10))
    c.update_and_fetch(_rows(10, 5), _rows(110, 5))
    c.compact(10, mx.array([0, 2, 4]))
    assert c.offset == 13
    k, v = c.state
    np.testing.assert_array_equal(np.array(k[0, 1, :, 0]), list(range(10)) + [10, 12, 14])
    np.testing.assert_array_equal(np.array(v[0, 0, 10:, 1]), [110, 112, 114])
    # Next writes land right after the compacted rows.
    k, _ = c.update_and_fetch(_rows(77, 1), _rows(77, 1))
    np.testing.assert_array_equal(np.array(k[0, 0, 10:, 0]), [10, 12, 14, 77])


def test_compact_empty_and_reordered():
    c = KVCache()
    c.update_and_fetch(_rows(0, 6), _rows(0, 6))
    c.compact(2, mx.array([3, 1]))  # rows 2.. := old 5, 3
    np.testing.assert_array_equal(np.array(c.state[0][0, 0, :, 0]), [0, 1, 5, 3])
    c.compact(1, mx.array([], dtype=mx.int32))
    assert c.offset == 1


def test_compact_host_indices_and_contiguous_shortcut():
    c = KVCache()
    c.update_and_fetch(_rows(0, 8), _rows(0, 8))
    before = c.keys
    c.compact(4, [0, 1, 2])  # already in place: nothing moves
    assert c.offset == 7 and c.keys is before
    c.compact(2, [0, 3])
    np.testing.assert_array_equal(np.array(c.state[0][0, 0, :, 0]), [0, 1, 2, 5])
