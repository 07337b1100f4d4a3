"""The part of the vLLM backend that runs inside every vLLM worker process.

vLLM mixes this class into its worker class (``worker_extension_cls``); the backend reaches it with
``collective_rpc("lpreg_...")``, which runs the method on every worker at once. Each worker is a
rank of its own in the learner's broadcast group (rank = JoinGroup.rank_offset + the worker's
vLLM rank), so a tensor-parallel engine receives the full weights on every shard, bucket by
bucket, and ``reload_weights`` slices them as at start-up while they arrive: each worker holds a
few buckets of received weights (the one being loaded, the previous one, and those whose tensors
vLLM's layer-by-layer reload keeps until a layer is complete), never the whole model.

Arguments cross the process boundary through vLLM's RPC serialiser, which turns tensors into
nested lists; everything here therefore travels as protobuf bytes and plain numbers.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from lpreg_core.weights import manifest_from_proto
from lpreg_core.wire.lpreg.v1 import control_pb2
from services.weight_sync import BroadcastError, BucketStream, WeightReceiver

log = logging.getLogger("lpreg.generator.vllm_worker")


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning of every reload.

    Rotary layers hold only the cos/sin table computed at start-up, which no checkpoint
    carries; the reloader puts the table back as it was and warns anyway, at every publish.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",)
        )


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
    _RotaryReloadFilter()
)

# Checkpoint names that a learner never sends although the checkpoint may hold them: with tied
# embeddings the output projection is the input embedding (the learner's named_parameters()
# lists it once), and vLLM's loaders skip it.
_TIED_OUTPUT_NAME = "lm_head.weight"
# Bytes of the little-endian header length that opens every safetensors file.
_SAFETENSORS_LEN_BYTES = 8


def checkpoint_tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors files of a Hugging Face model directory.

    Reads only the JSON headers, so it costs nothing for large models.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(_SAFETENSORS_LEN_BYTES))
            header: dict[str, Any] = json.loads(f.read(length))
        shapes.update(
            (name, tuple(int(d) for d in entry["shape"]))
            for name, entry in header.items()
            if name != "__metadata__"
        )
    return shapes


def check_weights(
    sent: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], tied: bool
) -> None:
    """Raise ValueError unless ``sent`` holds exactly the checkpoint's tensors and shapes.

    vLLM reloads layer by layer and processes a layer that got only part of its weights with
    whatever the rest holds, and a tensor of the wrong shape fails half way through the model,
    so a mismatched publish is rejected before anything is loaded.
    """
    if tied:
        expected = {n: s for n, s in expected.items() if n != _TIED_OUTPUT_NAME}
        sent = {n: s for n, s in sent.items() if n != _TIED_OUTPUT_NAME}
    missing = sorted(expected.keys() - sent.keys())
    unexpected = sorted(sent.keys() - expected.keys())
    reshaped = sorted(n for n in sent.keys() & expected.keys() if sent[n] != expected[n])
    if missing or unexpected or reshaped:
        raise ValueError(
            "published weights do not match the generator's checkpoint: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, "
            f"other shape {[(n, sent[n], expected[n]) for n in reshaped[:5]]}"
        )


def _reload_feed(
    stream: BucketStream, skip: str | None
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """What vLLM's reload consumes: the stream's tensors, less ``skip``.

    A broadcast error ends the feed instead of propagating: vLLM then finishes its layer-by-layer
    reload (puts back the layers that got nothing) and the model keeps its normal shape for the
    next, complete publish. The error stays in ``stream.error``.
    """
    try:
        for name, tensor in stream:
            if name != skip:
                yield name, tensor
    except BroadcastError:
        return


def _few(names: list[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


class LpregWorkerExtension:
    """Broadcast membership and in-place weight reloads for one vLLM worker.

    ``self`` is vLLM's worker (CPUWorker or the GPU Worker): ``self.rank`` is its rank in the
    engine, ``self.device`` its device and ``self.reload_weights`` its in-place loader. Method
    names carry an ``lpreg_`` prefix because vLLM refuses extensions that shadow worker methods.
    """

    # Set by vLLM's worker; declared for readers (annotations add no attribute that could
    # clash with the worker's own).
    rank: int
    device: torch.device
    vllm_config: Any

    def _lpreg_receiver(self) -> WeightReceiver:
        receiver = getattr(self, "_lpreg_weight_receiver", None)
        if receiver is None:
            receiver = WeightReceiver()
            self._lpreg_weight_receiver = receiver
        return receiver

    def _lpreg_checkpoint(self) -> tuple[dict[str, tuple[int, ...]], bool]:
        """Tensor shapes of the checkpoint the engine started from, and whether it is tied."""
        cached = getattr(self, "_lpreg_checkpoint_shapes", None)
        if cached is None:
            model_config = self.vllm_config.model_config
            tied = bool(getattr(model_config.hf_config, "tie_word_embeddings", False))
            cached = (checkpoint_tensor_shapes(model_config.model), tied)
            self._lpreg_checkpoint_shapes = cached
        return cached

    def lpreg_join(self, join_bytes: bytes) -> dict[str, Any]:
        """Join the epoch's group as rank ``rank_offset + self.rank`` (blocks until formed).

        Returns ``{"rank", "error"}``; a failure is reported, not raised, like a failed load.
        """
        join = control_pb2.JoinGroup.FromString(join_bytes)
        rank = join.rank_offset + self.rank
        # NCCL receives straight into this worker's GPU; Gloo into host memory.
        device = self.device if join.backend == "nccl" else torch.device("cpu")
        try:
            self._lpreg_receiver().join(
                epoch=join.epoch,
                rank=rank,
                world_size=join.world_size,
                store_host=join.store_host,
                store_port=join.store_port,
                backend=join.backend,
                timeout_s=join.timeout_s,
                device=device,
                secret=join.secret,
            )
        except Exception as e:  # reported to the backend, which fails the join
            return {"rank": rank, "error": f"{type(e).__name__}: {e}"}
        self._lpreg_receive_device = device
        return {"rank": rank, "error": ""}

    def lpreg_receive_and_load(self, manifest_bytes: bytes, timeout_s: float) -> dict[str, Any]:
        """Receive one publish bucket by bucket and reload the weights in place as it arrives.

        The caller pauses the engine first, so no forward pass runs while tensors change. Receive
        memory is a few buckets, never the whole model: vLLM's reload consumes the stream, casts
        each tensor to its parameter's dtype, and keeps a tensor only until its layer is complete
        (layers it cannot see complete, such as vocabulary-padded embeddings, until the end). The weight names and shapes are checked before anything is written
        (a misfit publish is received and discarded, the old weights stay); a broadcast failure
        mid-publish or a checksum mismatch after the last bucket leaves the model half loaded
        (``loaded_partially``). Errors come back in the result rather than as exceptions: the
        caller must know whether the model was touched, an exception would only arrive as text,
        and vLLM logs each one as a worker crash.
        """
        result: dict[str, Any] = {
            "rank": self.rank,
            "version": -1,
            "checksum": "",
            "receive_s": 0.0,
            "load_s": 0.0,
            "error": "",
            "loaded_partially": False,
            "peak_buffer_bytes": 0,
        }
        start = time.monotonic()
        receiver = self._lpreg_receiver()
        try:
            manifest = manifest_from_proto(control_pb2.WeightManifest.FromString(manifest_bytes))
            device = getattr(self, "_lpreg_receive_device", torch.device("cpu"))
            expected, tied = self._lpreg_checkpoint()
        except Exception as e:  # reported to the backend, which fails the publish
            result["error"] = f"{type(e).__name__}: {e}"
            return result
        try:
            check_weights({s.name: s.shape for s in manifest.tensors}, expected, tied)
        except ValueError as e:
            result["error"] = f"{type(e).__name__}: {e}"
            try:
                receiver.discard(manifest, timeout_s)
            except Exception as drain:  # the group is gone; the learner starts a new epoch
                result["error"] += f" (and draining the publish failed: {drain})"
            return result
        try:
            stream = receiver.receive_buckets(manifest, device, timeout_s)
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
            return result
        skip = _TIED_OUTPUT_NAME if tied else None
        with stream:
            weights = _reload_feed(stream, skip)
            try:
                with torch.no_grad():
                    self.reload_weights(  # type: ignore[attr-defined]
                        weights_iterator=weights, is_checkpoint_format=True
                    )
            except Exception as e:
                log.exception("in-place reload of v%d failed", manifest.version)
                result["error"] = f"{type(e).__name__}: {e}"
                # The reload moved the layers aside before the first tensor: any failure of it
                # leaves the model neither version.
                result["loaded_partially"] = True
            finally:
                weights.close()
        result["receive_s"] = stream.wait_s
        result["load_s"] = time.monotonic() - start - stream.wait_s
        result["peak_buffer_bytes"] = receiver.peak_buffer_bytes
        if result["error"]:
            return result
        if stream.error is not None:
            result["error"] = f"{type(stream.error).__name__}: {stream.error}"
            result["loaded_partially"] = stream.num_tensors > 0
            return result
        result["version"] = manifest.version
        result["checksum"] = manifest.checksum
        return result

    def lpreg_leave(self) -> None:
        receiver = getattr(self, "_lpreg_weight_receiver", None)
        if receiver is not None:
            receiver.leave()

    def lpreg_close(self) -> None:
        receiver = getattr(self, "_lpreg_weight_receiver", None)
        if receiver is not None:
            receiver.close()
