"""What signing costs per hop: `PYTHONPATH=<tree> python bench/signing.py [label]` (best of
5 x 20,000 calls; a hop signs and verifies two messages and makes two attempt tokens)."""
import sys, timeit, uuid
from cistate.adapters.rabbitmq.signing import Signer
s = Signer(b"0123456789abcdef" * 4)
body = b'{"run_id":"b8ed7268-1daf-4723-80d9-9e340295df64","step":"s1","attempt":1,"uses":"noop","with":{},"run":null,"timeout":0.0,"repo":"https://git.example.com/acme/app.git","ref":"refs/heads/main","commit":"' + b"a"*40 + b'","inputs":{},"token":"628a96a51b7ef06ddf2130ca9a6c3a1e","env":{},"secrets":[],"network":"default","origin":"deployment"}'
mid = str(uuid.uuid4())
sig = s.sign("step.s1.run", mid, "system", body)
n = 20000
t1 = min(timeit.repeat(lambda: s.sign("step.s1.run", mid, "system", body), number=n, repeat=5)) / n
t2 = min(timeit.repeat(lambda: s.verify("step.s1.run", mid, "system", sig, body), number=n, repeat=5)) / n
t3 = min(timeit.repeat(lambda: s.attempt_token(uuid.UUID(int=5), "s1", 1), number=n, repeat=5)) / n
print(f"{sys.argv[1] if len(sys.argv) > 1 else 'signing'}: sign {t1*1e6:.1f} us, verify {t2*1e6:.1f} us, token {t3*1e6:.1f} us; per hop (2 signed messages, each signed+verified, 2 tokens): {(2*(t1+t2)+2*t3)*1e6:.1f} us")
