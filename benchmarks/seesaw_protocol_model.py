"""A model of v36's hand-off protocol (kernel_versions/mla_decode_v36_seesaw.cu), no GPU needed.

The producer and the two math warpgroups are generators that mirror the kernel's waits and
arrivals (mbarriers by phase parity, named barriers, wgmma completion as a step), run in random
interleavings over random piece layouts, both RELEASE_BEFORE_SOFTMAX orders. Checked: no
deadlock; a stage holds the page being scored or read by P V; the P / factor / kept-max slot holds
the page being read; each group adds every page's P V once, in page order, after that page's
factor. A change to the kernel's order of waits and arrivals should be made here first.

    python benchmarks/seesaw_protocol_model.py
"""
import random

STAGES = 2

class MBar:
    def __init__(self, count): self.count, self.arrived, self.phase = count, 0, 0
    def arrive(self, n=1):
        self.arrived += n
        assert self.arrived <= self.count
        if self.arrived == self.count: self.arrived, self.phase = 0, self.phase + 1
    def done(self, parity): return (self.phase & 1) != parity

class Named:
    def __init__(self, parties): self.parties, self.waiting, self.gen = parties, 0, 0

def producer(st, pieces):
    it = 0
    for pb, pe in pieces:
        for page in range(pb, pe):
            s = it % STAGES
            yield ("wait", st.empty[s], ((it // STAGES) & 1) ^ 1)
            st.stage_page[s] = (it, "loading")
            yield ("step",)
            st.stage_page[s] = (it, "full")
            st.full[s].arrive()
            it += 1

def named_sync(st, bar):
    gen = bar.gen
    bar.waiting += 1
    if bar.waiting == bar.parties:
        bar.waiting, bar.gen = 0, bar.gen + 1
    else:
        yield ("until", lambda: bar.gen != gen)

def math_wg(st, wg, pieces, log, release_before_softmax):
    it = 0; npieces = 0
    for pb, pe in pieces:
        has = pe > pb
        if has:
            yield from named_sync(st, st.bar_math)
            st.q_writes += 1
            st.qready.arrive()   # this group's share of Q
            yield ("wait", st.qready, npieces & 1)
            assert st.q_piece_ok(npieces)
        own = None
        rowmax_from = None
        for page in range(pb, pe):
            s = it % STAGES
            scores = s == wg
            if not scores and page + 1 < pe:
                it += 1; continue
            if own is not None:
                st.empty[own[0]].arrive(); own = None
            if not scores:
                yield ("wait", st.pready[s], (it // STAGES) & 1)
                assert st.slot[s] == it, ("trailing slot", st.slot[s], it)
                assert st.stage_page[s] == (it, "full")
                log.append(("factor", it)); log.append(("pv", it))
                yield ("step",)
                assert st.stage_page[s] == (it, "full")
                st.empty[s].arrive()
                it += 1; continue
            yield ("wait", st.full[s], (it // STAGES) & 1)
            assert st.stage_page[s] == (it, "full")
            other = page > pb
            os_ = s ^ 1
            if other:
                yield ("wait", st.pready[os_], ((it - 1) // STAGES) & 1)
                assert st.slot[os_] == it - 1, ("slot", st.slot[os_], it - 1)
                assert st.stage_page[os_] == (it - 1, "full")
                log.append(("factor", it - 1)); log.append(("pv", it - 1))
                if release_before_softmax:
                    yield ("step",)
                    assert st.stage_page[os_] == (it - 1, "full")
                    st.empty[os_].arrive()
            yield ("step",)  # scores done, softmax
            assert st.stage_page[s] == (it, "full")
            log.append(("softmax", it))
            st.slot[s] = it
            st.pready[s].arrive(128)
            if other and not release_before_softmax:
                yield ("step",)
                assert st.stage_page[os_] == (it - 1, "full")
                st.empty[os_].arrive()
            log.append(("factor", it)); log.append(("pv", it))
            own = (s, it)
            it += 1
        if own is not None:
            yield ("step",)
            assert st.stage_page[own[0]] == (own[1], "full")
            st.empty[own[0]].arrive(); own = None
        if has:
            yield from named_sync(st, st.bar_math)
            npieces += 1
    st.finished[wg] = True

class State:
    def __init__(self):
        self.full = [MBar(1) for _ in range(STAGES)]
        self.empty = [MBar(2) for _ in range(STAGES)]        # one arrival per math group
        self.pready = [MBar(128) for _ in range(STAGES)]
        self.qready = MBar(2)
        self.bar_math = Named(2)
        self.stage_page = [None] * STAGES
        self.slot = [None] * STAGES
        self.q_writes = 0; self.finished = [False, False]
    def q_piece_ok(self, n): return self.q_writes == 2 * (n + 1)

def run(pieces, seed, release):
    rnd = random.Random(seed)
    st = State(); logs = [[], []]
    gens = {"p": producer(st, pieces), 0: math_wg(st, 0, pieces, logs[0], release),
            1: math_wg(st, 1, pieces, logs[1], release)}
    pending = {k: None for k in gens}
    alive = set(gens)
    def ready(k):
        c = pending[k]
        if c is None or c[0] == "step": return True
        if c[0] == "wait": return c[1].done(c[2])
        if c[0] == "until": return c[1]()
    steps = 0
    while alive:
        runnable = [k for k in alive if ready(k)]
        if not runnable:
            raise RuntimeError(f"deadlock: {pieces} seed {seed}: {[(k, pending[k]) for k in alive]}")
        k = rnd.choice(runnable)
        try: pending[k] = next(gens[k])
        except StopIteration: alive.discard(k)
        steps += 1
    n = sum(pe - pb for pb, pe in pieces)
    for wg in (0, 1):
        pvs = [i for kind, i in logs[wg] if kind == "pv"]
        facs = [i for kind, i in logs[wg] if kind == "factor"]
        assert pvs == list(range(n)), (wg, pvs)
        assert facs == list(range(n)), (wg, facs)
    # the scorer of each page is its parity's group
    for wg in (0, 1):
        assert all(i % 2 == wg for kind, i in logs[wg] if kind == "softmax")
    return steps

count = 0
for seed in range(4000):
    rnd = random.Random(seed)
    pieces = []; start = 0
    for _ in range(rnd.randint(1, 4)):
        L = rnd.choice([0, 0, 1, 1, 2, 3, 4, 5, 7, 8])
        pieces.append((start, start + L)); start += L + rnd.randint(0, 3)
    for release in (True, False):
        run(pieces, seed, release); count += 1
print("ok", count, "runs")
