"""dashkv: DASH-KV long-context attention through learned asymmetric binary hashing."""

from dashkv.apply import enable
from dashkv.cache import DashKVCache
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.models import load_model
from dashkv.stats import TierStats

__all__ = ["DashKVCache", "DashKVConfig", "HashEncoders", "TierStats", "enable", "load_model"]
__version__ = "0.1.0"
