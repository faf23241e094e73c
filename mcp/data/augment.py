"""Train-time augmentation: its names (read by the configuration and the CLI before torch
loads) and the torchvision transforms each name means."""

from __future__ import annotations

AUGMENTATIONS = ("auto", "none", "flip", "crop", "crop_flip")  # auto: the dataset's own default


def train_augment(kind: str, size: tuple[int, int]) -> list:
    """The transforms of augmentation ``kind`` (not ``auto``) for images of ``size``."""
    from torchvision import transforms as T  # torchvision loads when a dataset is augmented, not with the names

    crop = [T.RandomCrop(size, padding=max(1, size[0] // 8))]  # shifts of up to 1/8 of the side
    return {"crop_flip": crop + [T.RandomHorizontalFlip()], "crop": crop, "flip": [T.RandomHorizontalFlip()],
            "none": []}[kind]
