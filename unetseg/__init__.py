"""unetseg: U-Net semantic segmentation from folders of images and masks to
WebDataset shards, distributed training with Accelerate, and exact global mIoU."""

__version__ = "0.1.0"
