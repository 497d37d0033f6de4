"""Input vs reconstruction -> anomaly map -> image score -> threshold and verdict."""
from .anomaly_map import anomaly_map, feature_cosine_map, gaussian_blur, image_score, pixel_distance_map
from .domain_adapt import domain_adapt
from .heatmap import render_heatmap
from .threshold import Calibration

__all__ = ["anomaly_map", "feature_cosine_map", "gaussian_blur", "image_score", "pixel_distance_map",
           "domain_adapt", "render_heatmap", "Calibration"]
