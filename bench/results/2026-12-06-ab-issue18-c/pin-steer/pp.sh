#!/bin/bash
# usage: pp.sh tls|plain [extra indep args] -> ping-pong through ringlb (2 shards, env passes through) with indep-load: CPU/msg, cs/msg
target/release/ringlb-load echo --listen 127.0.0.1:27012 >/dev/null 2>&1 & E=$!
target/release/ringlb-load echo --listen 127.0.0.1:27013 >/dev/null 2>&1 & E2=$!
sed 's/servers = \[ { addr = "127.0.0.1:27012" } \]/servers = [ { addr = "127.0.0.1:27012" }, { addr = "127.0.0.1:27013" } ]/; s/shards = 2/shards = '${SHARDS:-2}'/' ringlb-tls.toml > r2.toml
target/release/ringlb run --config r2.toml >./r1.log 2>&1 & R=$!; sleep 0.5
M=$1; shift
if [ $M = tls ]; then U="wss://127.0.0.1:27023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --tls-resume"; else U="ws://127.0.0.1:27021/"; fi
bench/indep-load/target/release/indep-load pingpong --url $U --connections 200 --size 64 --duration 10s --json ./ppi.json "$@" > /dev/null 2>&1 & L=$!
sleep 4
cs() { for t in /proc/$R/task/*; do awk '/ctxt/{s+=$2} END{print s}' $t/status; done | awk '{s+=$1} END{print s}'; }
c0=$(cs); u0=$(awk '{print $14+$15}' /proc/$R/stat); sleep 5; c1=$(cs); u1=$(awk '{print $14+$15}' /proc/$R/stat)
wait $L
R2=$(python3 -c "import json; print(json.load(open('./ppi.json'))['msgs_per_s'])")
echo "$M ${RINGLB_PIN:+pin}${RINGLB_STEER:+steer}: msg/s=$R2 cpu_us/msg=$(echo "($u1-$u0)*10000/($R2*5)" | bc -l | cut -c1-5) cs/msg=$(echo "($c1-$c0)/($R2*5)" | bc -l | cut -c1-6)"
kill $R $E $E2; wait 2>/dev/null
