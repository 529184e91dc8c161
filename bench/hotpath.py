"""Per-hop CPU of the pure path, no I/O: `PYTHONPATH=<tree> python bench/hotpath.py [label]`.

Parse + decide + apply, the runs row and outbox bodies, sign/verify, the worker's command
parse and result; prints the median us of CPU per hop over 7 rounds of 300 runs (K=5)."""
import sys, time, uuid, statistics, asyncio
from datetime import datetime, UTC
from cistate.domain import pipeline as p, run as r
from cistate.domain.events import dumps, loads, derived_id
from cistate.service.orchestrator import parse
from cistate.adapters.rabbitmq.signing import Signer
from cistate.adapters.postgres import store as st
from cistate.domain.messages import StepCommand, StepResult, Push

text = "name: bench\nsteps:\n" + "".join(f"  - name: s{i}\n    uses: noop\n    timeout: 0\n" for i in range(1, 6))
pipe = p.parse(text, "<bench>", ["noop"])
signer = Signer(b"k" * 32)
decider = r.Decider(pipe, signer.attempt_token, ["noop"])

def row_bodies(outgoing):
    # what _append_all does per outgoing row, in either version of the code
    for o in outgoing:
        if hasattr(st, "encoded_body"):
            st.encoded_body(o.body)
        else:
            dumps(o.body.model_dump(mode="json", by_alias=True))

def one_run():
    mid = uuid.uuid4()
    push = parse("push", dumps({"repo": "https://h/app.git", "ref": "refs/heads/main", "commit": "a" * 40}).encode())
    state = r.RunState(id=r.run_id_for(mid))
    now = datetime.now(UTC)
    d = decider.decide(state, push, mid, now, "producer")
    for e in d.events: r.apply(state, e.type, e.data, now)
    st._run_row(state); row_bodies(d.outgoing)
    hops = 1
    while d.outgoing:
        o = d.outgoing[0]
        body = dumps(o.body.model_dump(mode="json", by_alias=True)).encode()
        sig = signer.sign(o.routing_key, str(o.message_id), "system", body)
        # worker
        signer.verify(o.routing_key, str(o.message_id), "system", sig, body)
        cmd = StepCommand.model_validate(loads(body))
        res = StepResult.model_validate({"run_id": cmd.run_id, "step": cmd.step, "attempt": cmd.attempt, "status": "succeeded", "outputs": {}})
        res = res.model_copy(update={"worker": "w", "token": cmd.token, "log": None, "started_at": now, "finished_at": now})
        rbody = dumps(res.model_dump(mode="json")).encode()
        rmid = derived_id(o.message_id, "result")
        rsig = signer.sign(f"step.{cmd.step}.result", str(rmid), "handler:w", rbody)
        # orchestrator
        signer.verify(f"step.{cmd.step}.result", str(rmid), "handler:w", rsig, rbody)
        msg = parse(f"step.{cmd.step}.result", rbody)
        d = decider.decide(state, msg, rmid, now, "handler:w")
        for e in d.events: r.apply(state, e.type, e.data, now)
        st._run_row(state); row_bodies(d.outgoing)
        [derived_id(rmid, i) for i in range(1, len(d.events))]
        hops += 1
    assert state.status == "succeeded", state.status
    return hops

for _ in range(50): one_run()
res = []
for rnd in range(7):
    t = time.process_time(); h = 0
    for _ in range(300): h += one_run()
    res.append((time.process_time() - t) / h * 1e6)
print(f"{sys.argv[1] if len(sys.argv)>1 else ''} us/hop median {statistics.median(res):.1f} (rounds {', '.join(f'{x:.0f}' for x in res)})")
