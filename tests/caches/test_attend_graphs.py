"""KVCache(attend_graphs=True): a layer's few-query attend captured once its history repeats and
replayed while only the tail grows (qkv.caches.attend_graphs). On the CPU the graph is emulated (a
replay runs the captured call again into the captured output, as a CUDA graph's replay writes its
own memory; the decode path's twin reads the live count back), which checks the plumbing: the
query copied in, the count of live tail keys kept on the device, one capture per history. On a GPU
the call is captured in a real CUDA graph and runs the decode kernel."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.caches.attend_graphs import AttendGraph

H, D = 2, 32


REPLAYS = [0]  # replays of emulated graphs so far


class Emulated:
    """A graph whose replay runs the captured call again into the captured output."""

    def __init__(self, call, out, pool):
        self.call, self.out, self._pool = call, out, pool

    def replay(self):
        REPLAYS[0] += 1
        self.out.copy_(self.call())

    def pool(self):
        return self._pool


def emulated_capture(call, pool):
    """As cuda_graph: a warm-up call, then the graph and the captured output, which every replay
    rewrites; a graph made from another's pool has that pool (else a new one). As in a CUDA
    graph's capture, the captured call does not run (its side effects, such as adding to the
    count of live keys, come with each replay): the output is memory that only replays write."""
    out = torch.empty_like(call())
    return Emulated(call, out, object() if pool is None else pool), out


def caches(policy, device="cpu", **options):
    """The same cache with graphs (emulated off a GPU) and without."""
    graphed = qkv.KVCache(policy, num_layers=1, attend_graphs=True, **options)
    if device == "cpu":
        graphed.layer(0).attend_graph = AttendGraph(emulated_capture, devices=("cpu",))
    return graphed, qkv.KVCache(policy, num_layers=1, **options)


def tokens(gen, n, device="cpu", dtype=torch.float32):
    return [torch.randn(1, H, n, D, generator=gen, device=device).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("policy, options", [
    ("qvg", dict(span_tokens=48, sink_tokens=5)),  # a sink before the spans
    ("kivi", dict(span_tokens=64)),  # a residual window: a span every 32 tokens
    ("rtn", dict(span_tokens=40)),
])
def test_replayed_steps_equal_eager_steps(policy, options):
    """A prompt, then 100 one-token steps (append, attend 4 query heads): every step's output
    equals the cache without graphs bit for bit; a graph is captured on the second call over a
    history and replayed until a span is compressed or the tail outgrows the room it reads, and a
    step that appends two tokens or drops one (crop) before attending has the count written anew."""
    gen = torch.Generator().manual_seed(0)
    graphed, eager = caches(policy, **options)
    prompt = tokens(gen, 70)
    for cache in (graphed, eager):
        cache.append(0, *prompt)
    graph = graphed.layer(0).attend_graph
    replays = REPLAYS[0]
    for step in range(100):
        new = tokens(gen, 2 if step == 30 else 1)
        for cache in (graphed, eager):
            cache.append(0, *new)
            if step == 60:
                cache.layer(0).drop_newest(1)
        q = torch.randn(1, 2 * H, 1, D, generator=gen)
        got, want = graphed.attend(0, q), eager.attend(0, q)
        assert torch.equal(got, want), step
        if graph.captures == 1 and step < 99:
            first_pool = graph._last.pool()
    # up to two eager calls and three captures a history (a span compressed, the tail past the room
    # read; the query read in place at two addresses, copied from elsewhere), the rest replayed
    assert 1 <= graph.captures <= 30 and REPLAYS[0] - replays >= 100 - 2 * graph.captures - 2
    assert graph.captures < 2 or graph._last.pool() is first_pool  # every capture from the first's pool


def test_a_replayed_output_is_the_graphs_own_and_the_next_replay_overwrites_it():
    gen = torch.Generator().manual_seed(1)
    graphed, _ = caches("rtn", span_tokens=4096)
    graphed.append(0, *tokens(gen, 50))
    where = torch.empty(1, 2 * H, 1, D)  # every query at one address: one graph
    outs, values = [], []
    for _ in range(4):
        graphed.append(0, *tokens(gen, 1))
        outs.append(graphed.attend(0, where.copy_(torch.randn(1, 2 * H, 1, D, generator=gen))))
        values.append(outs[-1].clone())
    assert graphed.layer(0).attend_graph.captures == 1
    assert outs[0] is not outs[1] and outs[1] is outs[2] is outs[3]  # eager, then captured and replayed
    assert torch.equal(outs[1], values[3]) and not torch.equal(values[1], values[3])


def steps_at(policy: str, seed: int, places: list[torch.Tensor]):
    """A 50-token prompt, then a one-token step per buffer of ``places``: the step's query written
    into it (where a model would have left it) and attended to with graphs and without, the outputs
    equal; the graphed layer's AttendGraph and its outputs."""
    gen = torch.Generator().manual_seed(seed)
    graphed, eager = caches(policy, span_tokens=4096)
    prompt = tokens(gen, 50)
    for cache in (graphed, eager):
        cache.append(0, *prompt)
    outs = []
    for step, place in enumerate(places):
        new = tokens(gen, 1)
        for cache in (graphed, eager):
            cache.append(0, *new)
        q = torch.randn(1, 2 * H, 1, D, generator=gen)
        outs.append(graphed.attend(0, place.copy_(q)))
        assert torch.equal(outs[-1], eager.attend(0, q)), step
    return graphed.layer(0).attend_graph, outs


def test_a_query_where_the_last_one_lay_is_read_in_place():
    """A model's query lands at one address step after step: the second call there captures a
    graph that reads it where it lies (nothing copied), which every call at that address replays.
    Before that graph, a query that moved once runs eagerly; after it, a query elsewhere is copied
    into a second graph's own query, captured from the same pool. Every output equals the cache's
    without graphs."""
    where = torch.empty(1, 2 * H, 1, D)
    elsewhere = [torch.empty(1, 2 * H, 1, D) for _ in range(3)]  # alive: three more addresses
    places = [elsewhere[0]] + [where] * 5 + elsewhere[1:] + [where] * 2
    graph, outs = steps_at("rtn", 5, places)
    # a new history: eager; moved, before any graph: eager; at the same address again: captured in
    # place, and replayed at that address from then on
    assert outs[0] is not outs[1] and outs[1] is not outs[2] and graph.replays["in place"] == 6
    assert all(out is outs[2] for out in outs[3:6] + outs[8:])
    # away from it: copied, into a graph of its own from the same pool
    assert outs[6] is outs[7] is not outs[2] and graph.replays["copied"] == 2 and graph.captures == 2
    (in_place, _), = graph._in_place.values()
    assert graph._last.pool() is in_place.pool()


def test_a_query_that_takes_two_addresses_in_turn_is_read_in_place_at_both():
    """A model's allocations may cycle over two steps: a query at one address, then another, in
    turn. A graph for each reads it in place; nothing is copied. A third address, even twice in a
    row, gets no third such graph (IN_PLACE): it is copied."""
    where = [torch.empty(1, 2 * H, 1, D) for _ in range(3)]
    graph, _ = steps_at("kivi", 6, where[:2] * 6 + where[2:] * 2)
    # a new history and a query elsewhere: eager; then one capture at each address, one to copy
    assert graph.captures == 3 and graph.replays == {"in place": 10, "copied": 2}


def test_calls_the_graph_does_not_take_run_eagerly():
    """Many queries (the staged or fused path), a chunk attended with ``extra``, a first call: no
    capture; and the cache without the option has no graph."""
    gen = torch.Generator().manual_seed(2)
    graphed, eager = caches("qvg", span_tokens=48)
    prompt = tokens(gen, 60)
    for cache in (graphed, eager):
        cache.append(0, *prompt)
    graph = graphed.layer(0).attend_graph
    many = torch.randn(1, 2 * H, 80, D, generator=gen)
    extra = tuple(tokens(gen, 3))
    for _ in range(3):
        assert torch.equal(graphed.attend(0, many), eager.attend(0, many))
        one = torch.randn(1, 2 * H, 1, D, generator=gen)
        assert torch.equal(graphed.attend(0, one, extra=extra), eager.attend(0, one, extra=extra))
    assert graph.captures == 0
    assert eager.layer(0).attend_graph is None


def test_a_capture_that_fails_runs_the_call_eagerly_and_says_why():
    def failing(call, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    gen = torch.Generator().manual_seed(3)
    graphed, eager = caches("rtn", span_tokens=4096)
    graphed.layer(0).attend_graph = AttendGraph(failing, devices=("cpu",))
    prompt = tokens(gen, 30)
    for cache in (graphed, eager):
        cache.append(0, *prompt)
    for _ in range(3):
        new, q = tokens(gen, 1), torch.randn(1, 2 * H, 1, D, generator=gen)
        for cache in (graphed, eager):
            cache.append(0, *new)
        assert torch.equal(graphed.attend(0, q), eager.attend(0, q))
    assert "not permitted" in graphed.layer(0).attend_graph.refused


def test_the_option_is_a_bool():
    with pytest.raises(qkv.errors.ConfigError, match="attend_graphs must be True or False"):
        qkv.KVCache("rtn", attend_graphs=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("policy", ["qvg", "kivi"])
@pytest.mark.parametrize("in_place", [False, True])
def test_cuda_graphs_replay_the_decode_kernel(policy, in_place):
    """On a GPU: bf16, GQA 32 / 8 heads of 128, 300 steps over a 3,000-token prompt; every step
    equal to the eager decode path within the kernel's own run-to-run splitting (the graph's
    launch is sized for the tail's room, not its tokens); queries at one address (read in place)
    or wherever the allocator puts them."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    graphed = qkv.KVCache(policy, num_layers=1, attend_graphs=True, span_tokens=1024)
    eager = qkv.KVCache(policy, num_layers=1, span_tokens=1024)
    prompt = [torch.randn(1, 8, 3000, 128, generator=gen, device="cuda").bfloat16() for _ in range(2)]
    for cache in (graphed, eager):
        cache.append(0, *prompt)
    where = torch.empty(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    for step in range(300):
        new = [torch.randn(1, 8, 1, 128, generator=gen, device="cuda").bfloat16() for _ in range(2)]
        for cache in (graphed, eager):
            cache.append(0, *new)
        q = torch.randn(1, 32, 1, 128, generator=gen, device="cuda").bfloat16()
        got = graphed.attend(0, where.copy_(q) if in_place else q)
        torch.testing.assert_close(got, eager.attend(0, q), atol=1e-2, rtol=0)
    graph = graphed.layer(0).attend_graph
    assert graph.captures >= 1 and graph.refused is None
    if in_place:
        assert graph.replays["copied"] == 0 and graph.replays["in place"] >= 250


def test_a_layer_under_a_window_bound_has_no_graph():
    """A sliding window evicts at every step: its layer never attends to one history twice, so it
    gets no graph (nor its per-call checks); lifting the bound gives it one again."""
    layer = qkv.KVCache("rtn", num_layers=1, attend_graphs=True).layer(0)
    assert layer.attend_graph is not None
    layer.bound_to(64)
    layer.reset()
    assert layer.attend_graph is None
    layer.bound_to(None)
    assert layer.attend_graph is not None


def test_a_graph_captured_when_the_tail_fills_its_buffer_reads_it_to_the_end():
    """kivi's residual window on one-token steps: a group leaves it every 16 tokens, a new history
    whose graphs read the tail's room to the buffer's end. The query moves at every step but two,
    the second of which is where the tail first fills its buffer: the graph that reads the query
    in place is captured then (its warm-up call attends to the whole room; the captured call, not
    run, does not count the step's token again), and every output equals the eager cache's."""
    gen = torch.Generator().manual_seed(7)
    graphed, eager = caches(qkv.build_policy("kivi", bits=4, block=16, window=4), span_tokens=16)
    for cache, prompt in zip((graphed, eager), [tokens(gen, 16)] * 2):
        cache.append(0, *prompt)
    layer, where, moved, full = graphed.layer(0), torch.empty(1, 2 * H, 1, D), [], []
    for step in range(30):
        new = tokens(gen, 1)
        for cache in (graphed, eager):
            cache.append(0, *new)
        if layer.buffer.run(layer.tail) is not None and layer.buffer.end == layer.buffer.capacity:
            full.append(step)
        q = torch.randn(1, 2 * H, 1, D, generator=gen)
        place = where if step in (22, 23) else moved.append(torch.empty_like(q)) or moved[-1]
        assert torch.equal(graphed.attend(0, place.copy_(q)), eager.attend(0, q)), step
        assert layer.attend_graph.replays["in place"] == (step >= 23), step
    assert full == [23]
