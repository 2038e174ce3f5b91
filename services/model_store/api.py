"""model-store's public surface for use in another process's own code: the CLI, bench/ and other tools
import these names, never the modules behind them (tests/foundation/test_contracts.py checks it).

- ``StoreClient`` and ``local_files``: the client of model-store's HTTP API (pushes, pulls, verification
  of what comes back) and the file listing a push uploads;
- ``read_huggingface``, ``read_ollama``: read a local Hugging Face snapshot or Ollama model into an import
  plan that ``StoreClient`` pushes with its origin (`strata model import`);
- ``convert_model``: convert a stored model to GGUF on this machine (`strata model convert`);
- ``catalog_bucket_config``: the catalog bucket, as `strata up` provisions it.

They stay in the service rather than shared/ because they are model-store's own rules: the client
checks a listing by model-store's file checks, the importers and the converter write what model-store
accepts. The wire types they speak are in shared/catalog.py; the signing-key info in shared/dsse.py.
"""

from services.model_store.adapters.catalog_kv import catalog_bucket_config
from services.model_store.client import StoreClient, local_files
from services.model_store.convert import convert_model
from services.model_store.imports.huggingface import read_huggingface
from services.model_store.imports.ollama import read_ollama

__all__ = ["StoreClient", "catalog_bucket_config", "convert_model", "local_files", "read_huggingface", "read_ollama"]
