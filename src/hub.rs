//! The one model downloader: Hugging Face hub snapshots into the hub cache layout.
