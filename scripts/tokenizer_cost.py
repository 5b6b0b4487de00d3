"""Memory and seconds to load an HF directory's tokenizer with `lowrax.load_tokenizer` and with
`transformers.AutoTokenizer`, each in a fresh process that has imported JAX first (as `lowrax train` has):

    .venv-test/bin/python scripts/tokenizer_cost.py [HF_DIR ...]      # default: the embedded MiniLM
"""

import subprocess
import sys

CHILD = """
import sys, time
import jax.numpy as jnp
jnp.zeros(1)
import lowrax
from lowrax.models.pretrained import import_transformers_quietly
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20
before, start = rss(), time.perf_counter()
if sys.argv[1] == 'lowrax':
    lowrax.load_tokenizer(sys.argv[2])
else:
    import_transformers_quietly()
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(sys.argv[2])
print(f"{sys.argv[1]:>13}: +{rss() - before} MB, {time.perf_counter() - start:.1f} s, torch imported: {'torch' in sys.modules}")
"""

if __name__ == "__main__":
    from lowrax.models.pretrained import embedded_minilm_path

    for directory in sys.argv[1:] or [str(embedded_minilm_path())]:
        print(directory)
        for loader in ("lowrax", "AutoTokenizer"):
            subprocess.run([sys.executable, "-c", CHILD, loader, directory], check=True)
