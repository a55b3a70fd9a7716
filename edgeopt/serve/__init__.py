"""The local inference server over a deploy folder."""
