"""The training code of the loop example: a scaled logistic regression on the breast-cancer data.

It follows the pipeline's train contract (docs/pipeline.md): the rows from EDGEWISE_TRAIN_DATA,
the columns EDGEWISE_FEATURES names, the label EDGEWISE_LABEL, the fitted model written with joblib
to EDGEWISE_MODEL_OUT. loop.py also runs it by hand for the first version, with the same
variables. Nothing in it is random, so `edgewise pipeline reproduce` gets the same model bytes.
"""

import json
import os

import joblib
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

frame = pd.read_parquet(os.environ["EDGEWISE_TRAIN_DATA"])
label = os.environ["EDGEWISE_LABEL"]
features = json.loads(os.environ.get("EDGEWISE_FEATURES", "null")) or [
    c for c in frame.columns if c != label
]
model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
model.fit(frame[features], frame[label])
joblib.dump(model, os.environ["EDGEWISE_MODEL_OUT"])
