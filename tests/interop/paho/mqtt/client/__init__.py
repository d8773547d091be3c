
from .main import Callback, Client
