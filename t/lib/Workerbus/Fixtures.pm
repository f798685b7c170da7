package Workerbus::Fixtures;

# Text that several block-format suites put in their blocks: one copy here.
# Workerbus::TestCore exports every variable named in @EXPORT to the
# suites; a block uses one as `--- config eval` `$::Name`, or
# `$::Name . <<'_EOC_'` to add text of its own. Lua helpers that blocks call
# are in t/lib/wbtest.lua instead.

use strict;
use warnings;

our @EXPORT = qw($HelloFromEveryWorker $HelloFromEveryWorkerBody);

# `location = /t`: waits (10 s at most) until each of 4 workers has
# recorded the events "hello" from all four, as "0,1,2,3" under
# from<worker id> in lua_shared_dict got, then prints what each recorded.
our $HelloFromEveryWorker = <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local got = ngx.shared.got
            require("wbtest").wait(function()
                for w = 0, 3 do
                    if got:get("from" .. w) ~= "0,1,2,3" then
                        return false
                    end
                end
                return true
            end)
            for w = 0, 3 do
                ngx.say("worker ", w, " got hello from ", got:get("from" .. w))
            end
        }
    }
_EOC_

our $HelloFromEveryWorkerBody = join '', map { "worker $_ got hello from 0,1,2,3\n" } 0 .. 3;

1;
