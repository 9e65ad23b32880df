#!/bin/bash
# usage: cs.sh WAIT_NR MIN_US  -> ctx switches and CPU of ringlb (1 shard) at 36k msg/s for 5 s
BIN/ringlb-load echo --listen 127.0.0.1:47012 >/dev/null 2>&1 & E=$!
RINGLB_WAIT_NR=$1 RINGLB_MIN_WAIT_US=$2 BIN/ringlb run --config r1.toml >./r1.log 2>&1 & R=$!
sleep 0.5
BIN/ringlb-load rate --url ws://127.0.0.1:47011/ --connections 200 --rate 36000 --duration 8s > ./rate.out 2>&1 & L=$!
sleep 2
T=$(ls /proc/$R/task | sed -n 2p)
sum() { for t in /proc/$R/task/*; do awk '/ctxt/{s+=$2} END{print s}' $t/status; done | awk '{s+=$1} END{print s}'; }
c0=$(sum); u0=$(awk '{print $14+$15}' /proc/$R/stat)
sleep 5
c1=$(sum); u1=$(awk '{print $14+$15}' /proc/$R/stat)
echo "nr=$1 min=$2 ctxsw/s=$(( (c1-c0)/5 )) cpu_ticks/5s=$((u1-u0)) per_msg_us=$(echo "($u1-$u0)*10000/(36000*5)" | bc -l | cut -c1-5) ctxsw/msg=$(echo "($c1-$c0)/(36000*5)" | bc -l | cut -c1-5)"
wait $L; kill $R $E; wait 2>/dev/null
