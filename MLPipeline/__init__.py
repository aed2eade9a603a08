"""Transfer-learning document classifier: the public API.

    from MLPipeline import TrainConfig, train, load_model, predict
    run = train(TrainConfig(data_dir="Data", epochs=10))
    model = load_model("output/model.pt")
    results = predict(model, ["a.jpg", "b.png"])
    export_model("output/model.pt", "onnx")  # output/model.onnx, for ONNX Runtime; load_model() takes it too

Each name is imported from its module when first used, so that importing one module loads only what it needs.
"""
import importlib

API = {"UserError": "Common", "build_index": "CreateDataset", "load_image": "CreateDataset",
       "load_images": "CreateDataset", "OnnxModel": "Export", "export_model": "Export", "TrainedModel": "Predict",
       "evaluate": "Predict", "load_model": "Predict", "predict": "Predict", "build_model": "ResNet_Model",
       "load_checkpoint": "ResNet_Model", "save_checkpoint": "ResNet_Model", "TrainConfig": "Train",
       "TrainingRun": "Train", "train": "Train", "explain": "Explain"}
__all__ = list(API)


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'MLPipeline' has no attribute '{name}'")
    return getattr(importlib.import_module(f"MLPipeline.{API[name]}"), name)
