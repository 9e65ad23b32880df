#!/bin/bash
# usage: mc.sh direct|sockmap|ringlb|nginx WORKERS [indep args, e.g. rate --rate 36000 | pingpong]
# -> machine busy CPU per message (all CPUs, /proc/stat), proxy CPU per message, kworker+ksoftirqd CPU per message
T=$1; W=$2; shift 2
target/release/ringlb-load echo --listen 127.0.0.1:27012 >/dev/null 2>&1 & E=$!
PIDS=""
case $T in
 direct) PORT=27012;;
 sockmap) python3 sockmap/relay.py 27030 27012 > sm.log 2>&1 & R=$!; PORT=27030; PIDS=$R;;
 ringlb) sed "s/shards = 2/shards = $W/" ringlb-tls.toml > rp.toml; target/release/ringlb run --config rp.toml > r1.log 2>&1 & R=$!; PORT=27021; PIDS=$R;;
 nginx) sed "s/WORKERS/$W/" nginx-plain.tmpl > np.conf; nginx -c /tmp/exp/np.conf -g 'daemon off;' & R=$!; PORT=27022;;
esac
sleep 1
[ $T = nginx ] && PIDS="$R $(pgrep -P $R)"
bench/indep-load/target/release/indep-load "$@" --url ws://127.0.0.1:$PORT/ --connections 200 --size 64 --duration 10s --warmup 2s --json ./mc.json > mc.out 2>&1 & L=$!
sleep 5
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
pcpu() { s=0; for p in $PIDS; do s=$((s+$(awk '{print $14+$15}' /proc/$p/stat))); done; echo $s; }
kw() { for p in $(pgrep 'kworker|ksoftirqd'); do awk '{print $14+$15}' /proc/$p/stat 2>/dev/null; done | awk '{s+=$1} END{print s+0}'; }
b0=$(busy); p0=$(pcpu); k0=$(kw); sleep 5; b1=$(busy); p1=$(pcpu); k1=$(kw)
wait $L
M=$(python3 -c "import json; print(json.load(open('./mc.json'))['msgs_per_s'])")
P99=$(python3 -c "import json; d=json.load(open('./mc.json')); print(d.get('p99_us', d.get('latency_us',{}).get('p99','?')))")
f() { echo "($1)*10000/($M*5)" | bc -l | cut -c1-5; }
echo "$T w$W $1: msg/s=$M machine_us/msg=$(f $b1-$b0) proxy_us/msg=$(f $p1-$p0) kworker_us/msg=$(f $k1-$k0) p99=$P99"
kill $R $E 2>/dev/null; wait 2>/dev/null
