//! Layers shared by every architecture: written once, so a model file holds only what differs.
