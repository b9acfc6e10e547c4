"""Every Triton kernel compiles for the GPUs users train on, without a GPU.

The interpreter (tests/test_kernels_triton.py, test_kernels_topk.py) checks what the kernels compute, but it is
lenient about what the compiler rejects (loop-carried types, scalar branches, barriers). Triton compiles ahead of
time for a named target, so here each kernel goes through the real compiler to PTX and the target's cubin for
Ampere (sm_80) and Hopper (sm_90), in every input dtype and constexpr variant that the launchers use, at the
tiles of the CUDA blocking (kernels/streamed.py). No device is touched.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs the real compiler")

TARGETS = [80, 90]
DTYPES = ["bf16", "fp16", "fp32"]


def compile_for(fn, signature: dict, constexprs: dict, capability: int, num_warps: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def assert_compiled(kernel, *, barrier: bool = False) -> None:
    ptx = kernel.asm.get("ptx", "")
    assert ".entry" in ptx, "no PTX entry point"
    assert kernel.asm.get("cubin"), "no cubin: ptxas did not assemble the PTX"
    if barrier:
        assert "bar.sync" in ptx or "barrier.sync" in ptx, "the -inf stores are not fenced from the row's reads"


@pytest.mark.parametrize("capability", TARGETS)
@pytest.mark.parametrize("e_dtype", DTYPES)
@pytest.mark.parametrize("scales,has_acc", [(1, True), (2, True), (1, False)])
def test_offset_rows_forward_kernel_compiles(capability, e_dtype, scales, has_acc):
    from ssb_kernels.streamed import CUDA_TILES
    from ssb_kernels.triton_rows import _offset_rows_fwd_kernel, row_warps

    sig = {"s_ptr": "*fp32", "e_ptr": f"*{e_dtype}", "off_ptr": "*i32", "col_ptr": "*i32", "slot_ptr": "*i64",
           "sx_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "inv_ptr": "*fp32",
           "r0": "i32", "C": "i32", "N": "i32", "H": "i32", "e_shift": "fp32", "tau": "fp32"}  # fmt: skip
    consts = {"S": scales, "TILE_C": CUDA_TILES[0], "TILE_H": CUDA_TILES[1], "HAS_ACC": has_acc}
    k = compile_for(_offset_rows_fwd_kernel, sig, consts, capability, row_warps(CUDA_TILES[0])["num_warps"])
    assert_compiled(k, barrier=True)


@pytest.mark.parametrize("capability", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scales", [1, 2])
def test_kd_dh_rows_kernel_compiles(capability, dtype, scales):
    from ssb_kernels.streamed import CUDA_TILES
    from ssb_kernels.triton_rows import K_TILE, _kd_dh_rows_kernel, row_warps

    sig = {"pw_ptr": "*fp32", "ca_ptr": "*fp32", "idx_ptr": "*i64", "cb_ptr": "*fp32", "w_ptr": f"*{dtype}",
           "dh_ptr": f"*{dtype}", "N": "i32", "H": "i32", "KX": "i32", "stride_w": "i32"}  # fmt: skip
    consts = {"S": scales, "TILE_H": CUDA_TILES[1], "K_TILE": K_TILE}
    assert_compiled(compile_for(_kd_dh_rows_kernel, sig, consts, capability, row_warps(CUDA_TILES[1])["num_warps"]))


@pytest.mark.parametrize("capability", TARGETS)
@pytest.mark.parametrize("kp,tp", [(1, 2), (64, 2), (256, 4)])
def test_topk_rows_kernel_compiles(capability, kp, tp):
    from ssb_kernels.streamed import CUDA_TILES
    from ssb_kernels.triton_rows import row_warps
    from ssb_kernels.triton_topk import _topk_rows_kernel

    sig = {"z_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "inv_ptr": "*fp32", "val_ptr": "*fp32",
           "id_ptr": "*i64", "cnt_ptr": "*i32", "r0": "i32", "v0": "i32", "C": "i32", "K": "i32"}  # fmt: skip
    consts = {"KP": kp, "TP": tp, "TILE_C": CUDA_TILES[0]}
    assert_compiled(compile_for(_topk_rows_kernel, sig, consts, capability, row_warps(CUDA_TILES[0])["num_warps"]))


@pytest.mark.parametrize("capability", TARGETS)
@pytest.mark.parametrize("e_dtype", DTYPES)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_hidden_kd_forward_kernel_compiles(capability, e_dtype, mode):
    from ssb_kernels.streamed import CUDA_TILES
    from ssb_kernels.triton_hidden import _hidden_kd_fwd_kernel
    from ssb_kernels.triton_rows import row_warps

    sig = {"s_ptr": "*fp32", "e_ptr": f"*{e_dtype}", **dict.fromkeys(
        ["xa_ptr", "mo_ptr", "mt_ptr", "lz_ptr", "lt_ptr", "ya_ptr", "c0_ptr", "u_ptr"], "*fp32"),
        "a_ptr": "*i64", "acc_ptr": "*fp32", "w_ptr": f"*{e_dtype}", "r0": "i32", "v0": "i32", "C": "i32",
        "H": "i32", "stride_w": "i32", "inv_t": "fp32", "sh0": "fp32", "sh1": "fp32", "lo_off": "i32"}  # fmt: skip
    split = mode != 2 and e_dtype == "bf16"  # triton_hidden.split_e: bf16 E is stored as rounding + residue
    consts = {"MODE": mode, "SPLIT": split, "TILE_C": CUDA_TILES[0], "TILE_H": CUDA_TILES[1]}
    assert_compiled(compile_for(_hidden_kd_fwd_kernel, sig, consts, capability, row_warps(CUDA_TILES[0])["num_warps"]))


@pytest.mark.parametrize("capability", TARGETS)
@pytest.mark.parametrize("e_dtype", DTYPES)
def test_hidden_jsd_kernel_compiles(capability, e_dtype):
    from ssb_kernels.streamed import CUDA_TILES
    from ssb_kernels.triton_hidden import _hidden_jsd_fwd_kernel
    from ssb_kernels.triton_rows import row_warps

    sig = {"s_ptr": "*fp32", "e_ptr": f"*{e_dtype}", **dict.fromkeys(
        ["lsez_ptr", "lset_ptr", "mo_ptr"], "*fp32"), "a_ptr": "*i64", **dict.fromkeys(
        ["u_ptr", "p0_ptr", "r1_ptr"], "*fp32"), "r0": "i32", "v0": "i32", "C": "i32",
        **dict.fromkeys(["inv_t", "log_b", "log_1mb", "beta", "sh0", "sh1"], "fp32"), "lo_off": "i32"}  # fmt: skip
    consts = {"SPLIT": e_dtype == "bf16", "TILE_C": CUDA_TILES[0]}
    assert_compiled(compile_for(_hidden_jsd_fwd_kernel, sig, consts, capability, row_warps(CUDA_TILES[0])["num_warps"]))
