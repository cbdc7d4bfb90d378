"""A Llama-architecture decoder (RMSNorm, rotary positions, grouped-query attention, SwiGLU) as an
ONNX graph with the KV-cache interface of optimum's exports, which the inference service reads:

  inputs   input_ids [batch, sequence] int64, attention_mask [batch, total_sequence] int64,
           position_ids [batch, sequence] int64,
           past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim] float
  outputs  logits [batch, sequence, vocab] float,
           present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim] float

Used by scripts/models/convert_smollm2.py for the real SmolLM2 weights and by
scripts/make-test-models.py for the tiny random-weight model CI runs, so the graph CI exercises is
the graph the real model uses. Only standard ONNX operators (opset 17, IR 9: ONNX Runtime >= 1.17).
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9
NEG_INF = -1e9


class Graph:
    """Writes an ONNX graph op by op with generated value names."""

    def __init__(self, name):
        self.name = name
        self.nodes = []
        self.initializers = []
        self.inputs = []
        self.outputs = []
        self._n = 0

    def _fresh(self, hint):
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, array, hint="const"):
        name = self._fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def i64(self, values, hint="i64"):
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def f32(self, values, hint="f32"):
        return self.const(np.asarray(values, dtype=np.float32), hint)

    def op(self, op_type, inputs, n_out=1, out=None, **attrs):
        outs = out if out is not None else [self._fresh(op_type.lower()) for _ in range(n_out)]
        if isinstance(outs, str):
            outs = [outs]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def input(self, name, elem, shape):
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name, elem, shape):
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def dim(self, tensor, axis):
        """A 1-element int64 tensor with tensor.shape[axis]."""
        shape = self.op("Shape", [tensor])
        return self.op("Gather", [shape, self.i64([axis])], axis=0)

    def model(self, doc):
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meshgate", doc_string=doc)
        m.ir_version = IR_VERSION
        return m


def build(cfg, weights, name, doc):
    """The decoder graph.

    cfg: vocab, hidden, heads, kv_heads, head_dim, layers, context_length, rope_theta, rms_eps.
    weights (float32 numpy arrays, matrices laid out for `x @ W`):
      embed [vocab, hidden]; per layer i: attn_norm.i [hidden], q.i [hidden, heads*head_dim],
      k.i / v.i [hidden, kv_heads*head_dim], o.i [heads*head_dim, hidden], ffn_norm.i [hidden],
      gate.i / up.i [hidden, ffn], down.i [ffn, hidden]; norm [hidden];
      lm_head [hidden, vocab] or absent (tied to embed); lm_bias [vocab] optional.
    """
    heads, kv_heads, head_dim, hidden = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["hidden"]
    g = Graph(name)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
    pos = g.input("position_ids", TensorProto.INT64, ["batch", "sequence"])
    pasts = []
    for i in range(cfg["layers"]):
        pk = g.input(f"past_key_values.{i}.key", TensorProto.FLOAT, ["batch", kv_heads, "past_sequence", head_dim])
        pv = g.input(f"past_key_values.{i}.value", TensorProto.FLOAT, ["batch", kv_heads, "past_sequence", head_dim])
        pasts.append((pk, pv))

    # Rotary tables indexed by position id: [batch, 1, seq, head_dim] (Hugging Face's rotate_half
    # layout: the first half of each head pairs with the second).
    inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(cfg["context_length"], dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    cos = g.op("Unsqueeze", [g.op("Gather", [g.f32(np.cos(angles), "rope_cos"), pos]), g.i64([1])])
    sin = g.op("Unsqueeze", [g.op("Gather", [g.f32(np.sin(angles), "rope_sin"), pos]), g.i64([1])])
    half = head_dim // 2

    def rope(v):
        first = g.op("Slice", [v, g.i64([0]), g.i64([half]), g.i64([3])])
        second = g.op("Slice", [v, g.i64([half]), g.i64([head_dim]), g.i64([3])])
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=3)
        return g.op("Add", [g.op("Mul", [v, cos]), g.op("Mul", [rotated, sin])])

    # Causal mask over absolute indices (past + new) combined with the padding mask.
    seq = g.op("Squeeze", [g.dim(ids, 1), g.i64([0])])
    total = g.op("Squeeze", [g.dim(mask, 1), g.i64([0])])
    key_idx = g.op("Range", [g.i64(0), total, g.i64(1)])
    query_idx = g.op("Range", [g.op("Sub", [total, seq]), total, g.i64(1)])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [key_idx, g.i64([0])]), g.op("Unsqueeze", [query_idx, g.i64([1])])])
    key_ok = g.op("Cast", [g.op("Unsqueeze", [mask, g.i64([1, 2])])], to=TensorProto.BOOL)
    allowed = g.op("And", [g.op("Unsqueeze", [causal, g.i64([0, 1])]), key_ok])
    masked = g.f32(NEG_INF)
    scale = g.f32(np.sqrt(head_dim))
    eps = g.f32(cfg["rms_eps"])

    def rms_norm(v, weight):
        var = g.op("ReduceMean", [g.op("Mul", [v, v])], axes=[-1], keepdims=1)
        normed = g.op("Div", [v, g.op("Sqrt", [g.op("Add", [var, eps])])])
        return g.op("Mul", [normed, g.f32(weight, "norm_weight")])

    def heads_first(v, n_heads):
        return g.op("Transpose", [g.op("Reshape", [v, g.i64([0, 0, n_heads, head_dim])])], perm=[0, 2, 1, 3])

    def repeat_kv(t):
        if heads == kv_heads:
            return t
        t = g.op("Expand", [g.op("Unsqueeze", [t, g.i64([2])]), g.i64([1, 1, heads // kv_heads, 1, 1])])
        return g.op("Reshape", [t, g.i64([0, heads, -1, head_dim])])

    embed = g.f32(weights["embed"], "embed_tokens")
    x = g.op("Gather", [embed, ids])
    for i, (past_k, past_v) in enumerate(pasts):
        h = rms_norm(x, weights[f"attn_norm.{i}"])
        q = rope(heads_first(g.op("MatMul", [h, g.f32(weights[f"q.{i}"], f"q_proj_{i}")]), heads))
        k = rope(heads_first(g.op("MatMul", [h, g.f32(weights[f"k.{i}"], f"k_proj_{i}")]), kv_heads))
        v = heads_first(g.op("MatMul", [h, g.f32(weights[f"v.{i}"], f"v_proj_{i}")]), kv_heads)
        present_k = g.op("Concat", [past_k, k], axis=2, out=f"present.{i}.key")
        present_v = g.op("Concat", [past_v, v], axis=2, out=f"present.{i}.value")
        scores = g.op("MatMul", [q, g.op("Transpose", [repeat_kv(present_k)], perm=[0, 1, 3, 2])])
        scores = g.op("Where", [allowed, g.op("Div", [scores, scale]), masked])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), repeat_kv(present_v)])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.i64([0, 0, heads * head_dim])])
        x = g.op("Add", [x, g.op("MatMul", [ctx, g.f32(weights[f"o.{i}"], f"o_proj_{i}")])])

        h = rms_norm(x, weights[f"ffn_norm.{i}"])
        gate = g.op("MatMul", [h, g.f32(weights[f"gate.{i}"], f"gate_proj_{i}")])
        up = g.op("MatMul", [h, g.f32(weights[f"up.{i}"], f"up_proj_{i}")])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, g.op("MatMul", [act, g.f32(weights[f"down.{i}"], f"down_proj_{i}")])])

        g.output(f"present.{i}.key", TensorProto.FLOAT, ["batch", kv_heads, "total_sequence", head_dim])
        g.output(f"present.{i}.value", TensorProto.FLOAT, ["batch", kv_heads, "total_sequence", head_dim])

    x = rms_norm(x, weights["norm"])
    lm_bias = weights.get("lm_bias")
    if "lm_head" in weights:
        logits = g.op("MatMul", [x, g.f32(weights["lm_head"], "lm_head")])
        if lm_bias is not None:
            logits = g.op("Add", [logits, g.f32(lm_bias, "lm_bias")])
        g.op("Identity", [logits], out="logits")
    else:
        # Tied embeddings: logits = x @ embed^T with Gemm(transB) on the same initializer, so the
        # 49152 x 576 table is stored once.
        flat = g.op("Reshape", [x, g.i64([-1, hidden])])
        gemm_inputs = [flat, embed] + ([g.f32(lm_bias, "lm_bias")] if lm_bias is not None else [])
        logits = g.op("Gemm", gemm_inputs, transB=1)
        batch_seq = g.op("Slice", [g.op("Shape", [ids]), g.i64([0]), g.i64([2]), g.i64([0])])
        g.op("Reshape", [logits, g.op("Concat", [batch_seq, g.i64([-1])], axis=0)], out="logits")
    g.output("logits", TensorProto.FLOAT, ["batch", "sequence", cfg["vocab"]])
    return g.model(doc)


def render_chatml(messages, default_system=None):
    """The ChatML prompt as SmolLM2's template (and the Rust service) renders it."""
    text = ""
    if default_system is not None and messages[0]["role"] != "system":
        text += f"<|im_start|>system\n{default_system}<|im_end|>\n"
    text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


class GreedyRunner:
    """Greedy decoding with Python onnxruntime over the KV-cache interface: the reference the Rust
    implementation must reproduce token for token."""

    def __init__(self, path, layers, kv_heads, head_dim, threads=1, session=None):
        import onnxruntime as ort

        if session is None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.sess = session
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.names = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]

    def forward(self, ids, past, past_len):
        n = len(ids)
        feed = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past_len + n), dtype=np.int64),
            "position_ids": np.arange(past_len, past_len + n, dtype=np.int64)[None, :],
        }
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = self.sess.run(self.names, feed)
        return out[0][0], out[1:]

    def empty_past(self):
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)] * (2 * self.layers)

    def greedy(self, prompt, max_tokens, eos_ids):
        """(tokens, finish_reason, logits of each step)."""
        logits, past = self.forward(prompt, self.empty_past(), 0)
        out, step_logits = [], [logits[-1]]
        while True:
            token = int(np.argmax(step_logits[-1]))
            if token in eos_ids:
                return out, "stop", step_logits
            out.append(token)
            if len(out) == max_tokens:
                return out, "length", step_logits
            logits, past = self.forward([token], past, len(prompt) + len(out) - 1)
            step_logits.append(logits[-1])

    def check_cache_matches_recompute(self, name, prompt, tokens, step_logits, steps=None):
        """Each cached step's logits must equal a from-scratch run over the whole sequence."""
        seq = list(prompt)
        for step, logits in enumerate(step_logits[:steps]):
            full, _ = self.forward(seq, self.empty_past(), 0)
            diff = float(np.max(np.abs(full[-1] - logits)))
            if diff > 1e-3 or int(np.argmax(full[-1])) != int(np.argmax(logits)):
                raise SystemExit(f"{name}: KV-cache step {step} differs from a full recompute (max |diff| {diff})")
            if step < len(tokens):
                seq.append(tokens[step])
