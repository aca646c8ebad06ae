"""Edit models in a real ComfyUI: the position ids the trainer gives the target and its reference (control) latents
equal the ids ComfyUI's own FLUX model builds for ReferenceLatent at inference — FLUX.1 Kontext's "offset" method
and FLUX.2's "index" method — read from the release's code at run time (comfy_reference_ids.py, run by its Python).

Cases are generated per release from what its code supports, never skipped there; skipped only where no ComfyUI is
configured (the CPU suite).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_core.models.family import FLUX1, FLUX2

sys.path.insert(0, str(Path(__file__).parent))
comfy_server = importlib.import_module("comfy_server")
COMFYUI_DIR, COMFYUI_PYTHON = comfy_server.COMFYUI_DIR, comfy_server.COMFYUI_PYTHON
SCRIPT = Path(__file__).parent / "comfy_reference_ids.py"

pytestmark = pytest.mark.skipif(not comfy_server.configured(), reason=comfy_server.SKIP_REASON)

# (target, references) in latent cells: one reference, two of one size, two of other sizes (the "offset" method
# places the second beside or below the first), three of mixed sizes.
CASES = {
    "one reference": ([8, 12], [[8, 12]]),
    "two references": ([8, 12], [[8, 12], [8, 12]]),
    "two references, tall second": ([8, 8], [[8, 8], [12, 4]]),
    "three references": ([6, 10], [[6, 10], [4, 4], [10, 2]]),
}


def _methods() -> set[str]:
    """The reference methods the configured release's FLUX model supports (all where none is configured)."""
    if not comfy_server.configured():
        return {"offset", "index"}
    source = (Path(COMFYUI_DIR) / "comfy" / "ldm" / "flux" / "model.py").read_text(encoding="utf-8")
    detection = (Path(COMFYUI_DIR) / "comfy" / "model_detection.py").read_text(encoding="utf-8")
    methods = {"offset"} if "ref_latents" in source and '"offset"' in source else set()
    if '"index"' in source and 'dit_config["ref_index_scale"]' in detection:
        methods.add("index")
    return methods


def _generated() -> list[tuple[str, str]]:
    methods = _methods()
    families = [name for name, method in (("FLUX.1", "offset"), ("FLUX.2", "index")) if method in methods]
    return [(f, c) for f in families for c in CASES]


def pytest_generate_tests(metafunc):
    if "family_name" in metafunc.fixturenames:
        params = _generated()
        metafunc.parametrize("family_name,case", params, ids=[f"{f}-{c}".replace(" ", "_") for f, c in params])


def _sizes(family_name: str, case: str):
    target, references = CASES[case]
    if family_name == "FLUX.2":  # FLUX.2 latents are /16: the same pictures in half the cells
        return [v // 2 for v in target], [[v // 2 for v in r] for r in references]
    return target, references


@pytest.fixture(scope="module")
def comfy_ids() -> dict:
    """ComfyUI's ids for every generated case, from one run of its Python (importing ComfyUI takes seconds)."""
    generated = _generated()
    requests = [dict(zip(("target", "references"), _sizes(f, c)), family=f) for f, c in generated]
    result = subprocess.run([COMFYUI_PYTHON, str(SCRIPT), json.dumps(requests)], cwd=COMFYUI_DIR,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(zip(generated, json.loads(result.stdout.strip().splitlines()[-1])))


def test_edit_kontext_reference_ids_equal_comfyuis_process_img(comfy_ids, family_name, case):
    target, references = _sizes(family_name, case)
    family = FLUX2 if family_name == "FLUX.2" else FLUX1
    comfy = comfy_ids[(family_name, case)]
    assert comfy["method"] == ("index" if family is FLUX2 else "offset")  # the release's default for the family
    ours = torch.cat([family.image_ids(*target), family.reference_ids([tuple(r) for r in references])]).float()
    assert torch.equal(ours, torch.tensor(comfy["ids"])), (ours.tolist(), comfy["ids"])
