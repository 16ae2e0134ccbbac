"""Detection's torch-free core: dataset descriptions (COCO JSON, YOLO txt) and the COCO metric."""
