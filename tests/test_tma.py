"""The host side of the Hopper kernels' tensor maps, without a GPU: the dimension order and the
NumPy twin of tfla::FusedMaps (its size is a static_assert in tests/test_config.py)."""

from tfla_cupy import _tma, config


def test_outer_dims_are_sorted_by_stride_with_their_coordinates():
    # (B, NH, S, D) contiguous, bf16: token stride D, head S·D, batch NH·S·D
    B, NH, S, D = 2, 3, 5, 128
    assert _tma.outer_dims((NH * S * D, S * D, D), S, NH, B, 2) == [
        (0, S, 2 * D), (1, NH, 2 * S * D), (2, B, 2 * NH * S * D)]
    # (B, S, NH, D): head stride D < token stride NH·D -> head is dimension 1
    assert _tma.outer_dims((S * NH * D, D, NH * D), S, NH, B, 2) == [
        (1, NH, 2 * D), (0, S, 2 * NH * D), (2, B, 2 * S * NH * D)]


def test_extent_one_dimensions_get_a_valid_stride():
    # packed sequences: B = 1 with an arbitrary (here 0) batch stride; one head
    dims = _tma.outer_dims((0, 7, 128), 1000, 1, 1, 2)
    assert [c for c, _, _ in dims] == [0, 1, 2]
    assert dims[0] == (0, 1000, 256)
    assert all(s == 256_000 for _, _, s in dims[1:])


def test_fused_maps_record_matches_the_cuda_struct():
    assert _tma.FUSED_MAPS_DTYPE.itemsize == config.FUSED_FWD["sizeof(tfla::FusedMaps)"] == 448
    assert _tma.FUSED_MAPS_DTYPE.fields["order"][1] == 3 * _tma.TMAP_BYTES
