"""The Triton kernels compile for an H100 (sm_90) without a GPU: triton.compile down to a cubin with ptxas."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from opcd_cli.kernels import topk_kl_triton as m

    def compile_(fn, signature, constexprs):
        kernel = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32), options={"num_warps": 8},
        )
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        return [line.strip() for line in usage.splitlines() if "REG:" in line][0]

    ptr = {"a_ptr": "*bf16", "b_ptr": "*bf16", "ids_ptr": "*i32", "cnt_ptr": "*i32", "pairs_ptr": "*fp32",
           "w_ptr": "*fp32", "loss_ptr": "*fp32", "mass_ptr": "*fp32", "stats_ptr": "*fp32", "ga_ptr": "*bf16",
           "gb_ptr": "*bf16"}
    def signature(fn, constexprs):
        return {
            n: "constexpr" if n in constexprs else ptr.get(n, "i64" if n.endswith("stride") else "i32")
            for n in fn.arg_names
        }

    out = {}
    # each gradient switch alone, and both at once (the largest pass 5); the candidate path and the radix one
    for first, second, fast in ((True, False, True), (False, True, True), (True, True, False)):
        fwd = {"RENORM": True, "TAIL": False, "ENTROPY": False, "UNION": False, "GRAD_FIRST": first,
               "GRAD_SECOND": second, "KEY_BITS": 16, "KEY_BITS_B": 16,
               "FAST": fast, "BLOCK_V": 2048, "STREAM_V": 4096, "BLOCK_K": 256, "BLOCK_C": 1024}
        bwd = {"RENORM": False, "GRAD_FIRST": first, "GRAD_SECOND": second, "STREAM_V": 4096, "BLOCK_K": 256}
        out[f"fwd first={first} second={second} fast={fast}"] = compile_(
            m._topk_kl_fwd_kernel, signature(m._topk_kl_fwd_kernel, fwd), fwd
        )
        out[f"bwd first={first} second={second}"] = compile_(
            m._topk_kl_bwd_kernel, signature(m._topk_kl_bwd_kernel, bwd), bwd
        )
    # the plain loss (the default) and the tail bucket, both gradients; the entropies (what the trainer runs);
    # the union support
    for renorm, tail, entropy, union in ((False, False, False, False), (False, True, False, False),
                                         (False, False, True, False), (False, False, True, True)):
        fwd = {"RENORM": renorm, "TAIL": tail, "ENTROPY": entropy, "UNION": union, "GRAD_FIRST": True,
               "GRAD_SECOND": True, "KEY_BITS": 16, "KEY_BITS_B": 16, "FAST": True, "BLOCK_V": 2048,
               "STREAM_V": 4096, "BLOCK_K": 256, "BLOCK_C": 1024}
        out[f"fwd tail={tail} renorm={renorm} entropy={entropy} union={union}"] = compile_(
            m._topk_kl_fwd_kernel, signature(m._topk_kl_fwd_kernel, fwd), fwd
        )
    print(json.dumps(out))
    """
)


def test_kernels_compile_for_sm90_without_spills():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(usage) == 10
    for name, line in usage.items():
        fields = dict(item.split(":") for item in line.split())
        assert fields["LOCAL"] == "0" and fields["STACK"] == "0", f"{name} spills: {line}"
        assert int(fields["REG"]) <= 128, f"{name} needs too many registers: {line}"
