#!/bin/bash
# 3 interleaved reps of direct, sockmap, ringlb, nginx at each load and worker count
for W in 2 1; do for LOAD in "rate --rate 18000" "rate --rate 36000" "pingpong"; do for rep in 1 2 3; do
 for t in direct sockmap ringlb nginx; do bash mc.sh $t $W $LOAD 2>&1 | grep -v Terminated | sed "s/^/$(echo $LOAD | tr ' ' _) rep$rep /"; done
done; done; done
