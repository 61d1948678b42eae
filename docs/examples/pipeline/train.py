"""The training code an edgewise pipeline runs (the contract: docs/pipeline.md).

It reads the training rows from EDGEWISE_TRAIN_DATA, fits on the columns EDGEWISE_FEATURES names
to the label EDGEWISE_LABEL, and writes the fitted model with joblib to EDGEWISE_MODEL_OUT.
Everything random is seeded, so `edgewise pipeline reproduce` gets the same model bytes.
"""

import argparse
import json
import os

import joblib
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

parser = argparse.ArgumentParser()
parser.add_argument("--C", type=float, default=1.0)
args = parser.parse_args()

frame = pd.read_parquet(os.environ["EDGEWISE_TRAIN_DATA"])
features = json.loads(os.environ["EDGEWISE_FEATURES"])
model = make_pipeline(StandardScaler(), LogisticRegression(C=args.C, max_iter=2000))
model.fit(frame[features], frame[os.environ["EDGEWISE_LABEL"]])
joblib.dump(model, os.environ["EDGEWISE_MODEL_OUT"])
