"""Image-classification data: an image folder with one subfolder per class.

    photos/cat/001.jpg, photos/cat/002.png, photos/dog/001.jpg, ...      -> labels by sorted class name
    photos/train/cat/..., photos/validation/cat/...                         -> the splits as given

Records are `{"image": path, "label": index}`; `data.source` may also be a `datasets`
`save_to_disk` directory with image and label columns (`data.image_field`, `data.label_field`).
"""

from __future__ import annotations

from pathlib import Path

from lowrax.errors import LowraxError
from lowrax.io.images import IMAGE_SUFFIXES

SPLITS = ("train", "validation", "test")


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _images(p))


def is_image_folder(path: Path) -> bool:
    """A directory of class subfolders holding images (or of train/validation/test splits of them)."""
    if not path.is_dir() or is_saved_dataset(path):
        return False
    split_dirs = [path / s for s in SPLITS if (path / s).is_dir()]
    return any(_classes(d) for d in split_dirs) or bool(_classes(path))


def image_folder_splits(path: Path) -> dict[str, list[dict]]:
    """{split: records} of an image folder; the classes (sorted names) are those of the train split."""
    split_dirs = {s: path / s for s in SPLITS if (path / s).is_dir() and _classes(path / s)}
    if not split_dirs:
        split_dirs = {"train": path}
    if "train" not in split_dirs:
        raise LowraxError(f"image folder {path} has {', '.join(split_dirs)} but no train/ split")
    classes = _classes(split_dirs["train"])
    if len(classes) < 2:
        raise LowraxError(f"image folder {split_dirs['train']} needs at least two class subfolders with images "
                          f"(found {classes or 'none'})")
    index = {name: i for i, name in enumerate(classes)}
    out = {}
    for split, folder in split_dirs.items():
        unknown = sorted(set(_classes(folder)) - set(index))
        if unknown:
            raise LowraxError(f"{folder} has classes the train split lacks: {', '.join(unknown)}")
        out[split] = [{"image": str(p), "label": index[name], "class_name": name}
                      for name in _classes(folder) for p in _images(folder / name)]
    return out
