"""Write data.parquet for the example: scikit-learn's breast-cancer data, columns named without
spaces, plus a categorical `size` column to slice the evaluation by (not a feature)."""

from sklearn.datasets import load_breast_cancer

frame = load_breast_cancer(as_frame=True).frame
frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
frame["size"] = (frame["mean_radius"] > 14).map({True: "large", False: "small"})
frame.to_parquet("data.parquet", index=False)
