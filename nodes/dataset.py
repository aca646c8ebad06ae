"""FluxLoraDataset: an image folder (or an IMAGE batch) with captions → FLUX_LORA_DATASET; with a control folder
(or a second IMAGE batch), the pairs of an edit LoRA (FLUX.1 Kontext, FLUX.2 reference images)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..trainer_core.config import CROP_MODES, IMAGE_EXTENSIONS, DatasetConfig
from ..trainer_core.errors import TrainerInputError
from . import comfy_bridge as bridge

CATEGORY = "FLUX LoRA"
NO_FOLDER = "(none: use the images input)"
NO_CONTROLS = "(none: not an edit dataset)"
CAPTION_SOURCES = {  # widget label → DatasetConfig.caption_fallback
    "caption .txt, else file name": "stem",
    "caption .txt, else trigger word only": "trigger",
}
MAX_RESOLUTION = 4096


@dataclass
class DatasetSpec:
    """What flows on a FLUX_LORA_DATASET wire: the scanned items and the settings they came from."""

    items: list  # trainer_core DatasetItem
    config: DatasetConfig
    source: str  # the folder, or "IMAGE batch"

    def __repr__(self) -> str:  # ComfyUI may log inputs; keep it short
        return f"DatasetSpec({len(self.items)} items from {self.source})"


def parse_resolutions(text: str) -> list[int]:
    """"512" or "512, 768, 1024" → [512, 768, 1024]."""
    values = []
    for part in text.replace(";", ",").replace(" ", ",").split(","):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise TrainerInputError(
                f"resolutions: '{part}' is not a whole number. Give sizes in pixels separated by commas, e.g. "
                f"'512' or '512, 768, 1024'."
            ) from None
        if not 64 <= value <= MAX_RESOLUTION:
            raise TrainerInputError(f"resolutions: {value} is outside 64–{MAX_RESOLUTION} px.")
        values.append(value)
    if not values:
        raise TrainerInputError("resolutions: give at least one training size in pixels, e.g. '512'.")
    return sorted(set(values))


def _folders() -> list[str]:
    folders = bridge.comfy_folders()
    return bridge.subfolders(folders[0] if folders else None, IMAGE_EXTENSIONS) + [NO_FOLDER]


class FluxLoraDataset:
    DESCRIPTION = ("Training images and captions: a subfolder of ComfyUI's input folder with images and same-name "
                   ".txt captions, or an IMAGE batch from other nodes.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("FLUX_LORA_DATASET",)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The training items (image, caption, bucket size, crop, flip); connect to FLUX LoRA Cache.",)

    @classmethod
    def INPUT_TYPES(cls):
        folders = _folders()
        return {
            "required": {
                "folder": (folders, {
                    "default": folders[0],
                    "tooltip": "A subfolder of ComfyUI's input folder holding the images "
                               f"({', '.join(IMAGE_EXTENSIONS)}) and same-name .txt captions. Refresh the page "
                               "after adding a folder."}),
                "caption_source": (list(CAPTION_SOURCES), {
                    "default": next(iter(CAPTION_SOURCES)),
                    "tooltip": "Where captions come from: the image's .txt file; without one, the file name "
                               "(underscores as spaces) or nothing but the trigger word."}),
                "trigger_word": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "A rare word put in front of every caption ('trigger, caption'); use it in your "
                               "prompts to call up what the LoRA learned. Empty = none."}),
                "resolutions": ("STRING", {
                    "default": "512", "multiline": False,
                    "tooltip": "Training sizes in pixels (multiples of 16), comma separated, e.g. '512' or "
                               "'512, 768, 1024'. Each image is trained at every size it is large enough for."}),
                "buckets": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "On: keep each image's aspect ratio (area-preserving buckets up to 2:1). "
                               "Off: square crops."}),
                "crop": (list(CROP_MODES), {
                    "default": "center",
                    "tooltip": "Which part of an image to keep when it does not fit its bucket exactly: the "
                               "center, or a random spot chosen once per image."}),
                "repeats": ("INT", {
                    "default": 1, "min": 1, "max": 1000,
                    "tooltip": "How often each image appears per epoch; raise it for images that matter more "
                               "or for very small datasets."}),
                "flip": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also train on the mirrored image. Leave off for asymmetric subjects "
                               "(text, logos, faces with a parting)."}),
            },
            "optional": {
                "images": ("IMAGE", {
                    "tooltip": "An IMAGE batch to train on instead of the folder (all images of one size)."}),
                "captions": ("STRING", {
                    "default": "", "multiline": True,
                    "tooltip": "Captions for the images input: one per line, in batch order; one line for all "
                               "images; or empty for the trigger word alone."}),
                "custom_folder": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": f"An absolute folder path instead of 'folder'. Only honoured when ComfyUI runs with "
                               f"the environment variable {bridge.ALLOW_PATHS_ENV}=1 (a shared server stays "
                               f"limited to its input folder)."}),
                "masked_loss": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Weight the loss by a grey-scale mask per image (white = learn, black = ignore): "
                               "<name><mask_suffix>.png beside each image in the folder, or the masks input for "
                               "an IMAGE batch. Images without a mask train everywhere."}),
                "mask_suffix": ("STRING", {
                    "default": "_mask", "multiline": False,
                    "tooltip": "With masked_loss: the mask of cat.png is cat<suffix>.png (masks are not trained "
                               "on as images)."}),
                "masks": ("MASK", {
                    "tooltip": "With masked_loss and the images input: one MASK per image (or one for all), the "
                               "size of the images."}),
                "control_folder": ([NO_CONTROLS] + _folders()[:-1], {
                    "default": NO_CONTROLS,
                    "tooltip": "Edit LoRA (FLUX.1 Kontext, FLUX.2 reference images): a subfolder of the input "
                               "folder holding each image's control, the image before the edit, under the same "
                               "name (cat.png, or cat_0.png, cat_1.png … for several). The images above are the "
                               "edited results and their captions the edit instructions."}),
                "control_images": ("IMAGE", {
                    "tooltip": "Edit LoRA with the images input: the control images (before the edit), one per "
                               "image, in the same order."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, folder, control_folder=NO_CONTROLS):
        # Our own check replaces ComfyUI's "value not in list", so the message says what to do.
        folders = bridge.comfy_folders()
        where = folders[0] if folders else "ComfyUI's input folder"
        if folder != NO_FOLDER and folder not in _folders():
            return (f"folder '{folder}' does not exist in {where}. Create it with your images and .txt captions "
                    f"and refresh the page, or pick another folder.")
        if control_folder != NO_CONTROLS and control_folder not in _folders():
            return (f"control_folder '{control_folder}' does not exist in {where}. Create it with the control "
                    f"images and refresh the page, or pick another folder.")
        return True

    @classmethod
    def IS_CHANGED(cls, folder, custom_folder="", control_folder=NO_CONTROLS, **_):
        """Rescan when files in the folder (or the control folder) change (names, sizes, times), though the
        widgets did not."""
        folders = bridge.comfy_folders()
        if folders is None or (folder == NO_FOLDER and not custom_folder.strip()):
            return ""
        try:
            paths = [bridge.resolve_dataset_folder(folders[0], folder, custom_folder)]
            if control_folder != NO_CONTROLS:
                paths.append(bridge.resolve_dataset_folder(folders[0], control_folder))
            entries = [sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
                       for path in paths]
        except (OSError, TrainerInputError):
            return ""  # the node itself reports the problem
        return hashlib.sha256(repr(entries if len(entries) > 1 else entries[0]).encode()).hexdigest()

    def build(self, folder, caption_source, trigger_word, resolutions, buckets, crop, repeats, flip,
              images=None, captions="", masked_loss=False, mask_suffix="_mask", masks=None, custom_folder="",
              control_folder=NO_CONTROLS, control_images=None):
        from ..trainer_core.data.dataset import dataset_from_images, scan_dataset
        from ..trainer_core.data.pairs import controls_from_images

        if caption_source not in CAPTION_SOURCES:
            raise TrainerInputError(f"caption_source: '{caption_source}' is not one of {', '.join(CAPTION_SOURCES)}.")
        cfg = DatasetConfig(trigger_word=trigger_word.strip(), caption_fallback=CAPTION_SOURCES[caption_source],
                            resolutions=parse_resolutions(resolutions), buckets=buckets, crop=crop, flip=flip,
                            repeats=repeats, masked_loss=masked_loss, mask_suffix=mask_suffix.strip())
        if images is not None:
            if masked_loss and masks is None:
                raise TrainerInputError("masks: masked_loss is on for an IMAGE batch but no MASK is connected. "
                                        "Connect one mask per image to 'masks', or turn masked_loss off.")
            if control_folder != NO_CONTROLS:
                raise TrainerInputError("control_folder: the controls of an IMAGE batch come from 'control_images', "
                                        "not a folder. Connect the control images there, or set control_folder "
                                        "to none.")
            lines = [line.strip() for line in captions.splitlines() if line.strip()]
            items = dataset_from_images(images, lines, cfg.validate(), masks=masks)
            if control_images is not None:
                items = controls_from_images(items, control_images, cfg)
            return (DatasetSpec(items, cfg, f"IMAGE batch of {images.shape[0]}"),)
        if control_images is not None:
            raise TrainerInputError("control_images: they pair with the 'images' input, which is not connected. "
                                    "Connect the edited images to 'images', or give a control_folder instead.")
        if folder == NO_FOLDER and not custom_folder.strip():
            raise TrainerInputError("folder: none chosen. Pick a subfolder of ComfyUI's input folder with your "
                                    "images, or connect an IMAGE batch to 'images'.")
        folders = bridge.comfy_folders()
        if folders is None:
            raise TrainerInputError("folder: reading a folder needs ComfyUI's input folder; run inside ComfyUI.")
        path = bridge.resolve_dataset_folder(folders[0], folder, custom_folder)
        cfg.folder = str(path)
        if control_folder != NO_CONTROLS:
            cfg.control_folder = str(bridge.resolve_dataset_folder(folders[0], control_folder))
        return (DatasetSpec(scan_dataset(cfg, bridge.allowed_roots()), cfg, str(path)),)
