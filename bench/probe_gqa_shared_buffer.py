"""Probe: ONNX Runtime's com.microsoft GroupQueryAttention updating a KV cache in place.

The KV-cache issue plans decode steps that write into preallocated cache buffers instead of
concatenating. This probe checks the mechanism on this machine's ORT build: one GQA node
whose past_key/past_value and present_key/present_value are bound (I/O binding) to the same
[B, Hkv, MAX, D] buffers, run as a 12-token prefill and then single-token steps, against
torch's sdpa on the whole sequence. ``seqlens_k`` is the valid length minus one per row and
``total_sequence_length`` the valid length; the buffer capacity is MAX.

    python bench/probe_gqa_shared_buffer.py
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto as TP
from onnx import helper

B, Hq, Hkv, D, MAX = 2, 9, 3, 64, 64
def model():
    inputs = [helper.make_tensor_value_info("q", TP.FLOAT, [B, "S", Hq*D]),
              helper.make_tensor_value_info("k", TP.FLOAT, [B, "S", Hkv*D]),
              helper.make_tensor_value_info("v", TP.FLOAT, [B, "S", Hkv*D]),
              helper.make_tensor_value_info("past_k", TP.FLOAT, [B, Hkv, "P", D]),
              helper.make_tensor_value_info("past_v", TP.FLOAT, [B, Hkv, "P", D]),
              helper.make_tensor_value_info("seqlens_k", TP.INT32, [B]),
              helper.make_tensor_value_info("total", TP.INT32, [])]
    outputs = [helper.make_tensor_value_info("out", TP.FLOAT, [B, "S", Hq*D]),
               helper.make_tensor_value_info("present_k", TP.FLOAT, [B, Hkv, "M", D]),
               helper.make_tensor_value_info("present_v", TP.FLOAT, [B, Hkv, "M", D])]
    node = helper.make_node("GroupQueryAttention", ["q","k","v","past_k","past_v","seqlens_k","total"], ["out","present_k","present_v"], domain="com.microsoft", num_heads=Hq, kv_num_heads=Hkv, scale=1/8)
    g = helper.make_graph([node], "g", inputs, outputs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("",21), helper.make_opsetid("com.microsoft",1)], ir_version=10)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
def ref(q, k, v):  # q [B,S,Hq,D] full sequences k [B,T,Hkv,D]
    q=torch.tensor(q).transpose(1,2); k=torch.tensor(k).transpose(1,2); v=torch.tensor(v).transpose(1,2)
    L,S=q.shape[2],k.shape[2]
    mask=torch.ones(L,S,dtype=torch.bool).tril(S-L)
    return torch.nn.functional.scaled_dot_product_attention(q,k,v,attn_mask=mask,enable_gqa=True,scale=1/8).transpose(1,2).numpy()
rng=np.random.default_rng(0)
T=20
Q=rng.standard_normal((B,T,Hq,D),dtype=np.float32); K=rng.standard_normal((B,T,Hkv,D),dtype=np.float32); V=rng.standard_normal((B,T,Hkv,D),dtype=np.float32)
want=ref(Q,K,V)
sess = model()
# shared buffers of capacity MAX, bound to both past and present
kbuf=ort.OrtValue.ortvalue_from_numpy(np.zeros((B,Hkv,MAX,D),np.float32))
vbuf=ort.OrtValue.ortvalue_from_numpy(np.zeros((B,Hkv,MAX,D),np.float32))
def step(lo, hi):
    io=sess.io_binding()
    S=hi-lo
    io.bind_cpu_input("q", Q[:,lo:hi].reshape(B,S,Hq*D).copy())
    io.bind_cpu_input("k", K[:,lo:hi].reshape(B,S,Hkv*D).copy())
    io.bind_cpu_input("v", V[:,lo:hi].reshape(B,S,Hkv*D).copy())
    io.bind_ortvalue_input("past_k", kbuf); io.bind_ortvalue_input("past_v", vbuf)
    io.bind_cpu_input("seqlens_k", np.full((B,), hi-1, np.int32))
    io.bind_cpu_input("total", np.array(hi, np.int32))
    io.bind_output("out")
    io.bind_ortvalue_output("present_k", kbuf); io.bind_ortvalue_output("present_v", vbuf)
    sess.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[0].reshape(B,S,Hq,D)
outs=[step(0,12)]+[step(t,t+1) for t in range(12,T)]
got=np.concatenate(outs,axis=1)
result = {
    "probe": "gqa_shared_buffer", "onnxruntime": ort.__version__,
    "max_abs_diff_vs_sdpa": float(np.abs(got - want).max()),
    "cache_rows_written_match_keys": float(np.abs(kbuf.numpy()[:, :, :T] - K.transpose(0, 2, 1, 3)).max()) == 0.0,
    "cache_rows_beyond_untouched": float(np.abs(kbuf.numpy()[:, :, T:]).max()) == 0.0,
}
print(json.dumps(result, indent=2))
out = Path(__file__).parent / "results" / "probe_gqa_shared_buffer.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
