"""Transfer-learning document classifier.

The recipe is MLPipeline.Train.train (with CreateDataset and ResNet_Model): read it top to bottom.
The tool around it, every option of engine.py, is MLPipeline.extras; its public API is here:

    from MLPipeline import RunConfig, train, load_model, predict
    run = train(RunConfig(data_dir="Data", epochs=10, val_size=0.2))
    results = predict(load_model("output/model.pt"), ["a.jpg", "b.png"])

Each name is imported from its module when first used: importing one module loads only what it needs.
"""
import importlib

API = {"TrainConfig": "Train", "TrainingRun": "Train", "UserError": "CreateDataset", "build_index": "CreateDataset",
       "load_image": "CreateDataset", "build_model": "extras.Weights", "save_checkpoint": "ResNet_Model",
       "RunConfig": "extras.Run", "train": "extras.Run", "load_images": "extras.Data",
       "load_checkpoint": "extras.Checkpoint", "TrainedModel": "extras.Predict", "evaluate": "extras.Predict",
       "load_model": "extras.Predict", "predict": "extras.Predict", "OnnxModel": "extras.Export",
       "export_model": "extras.Export", "explain": "extras.Explain"}
__all__ = list(API)


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'MLPipeline' has no attribute '{name}'")
    return getattr(importlib.import_module(f"MLPipeline.{API[name]}"), name)
