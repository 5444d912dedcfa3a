-- Argo CD health of a LeptonModel (resource.customizations.health.lepton.ai_LeptonModel).
-- Reads what the operator writes: status.phase, the kstatus conditions Ready,
-- Reconciling and Stalled, and status.observedGeneration. A paused rollout waits for a
-- person: Suspended. Degraded with Stalled=False (serving pods restarting, within the
-- rollout's progress deadline) is Progressing, as for a Deployment.
local hs = {status = "Progressing", message = "waiting for the operator"}
if obj.status == nil then
  return hs
end
local s = obj.status
local ready, stalled = nil, nil
if s.conditions ~= nil then
  for _, c in ipairs(s.conditions) do
    if c.type == "Ready" then ready = c end
    if c.type == "Stalled" then stalled = c end
  end
end
local message = (ready and ready.message) or (s.phase or "")
if s.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and s.observedGeneration < obj.metadata.generation then
  hs.status, hs.message = "Progressing", "the operator has not seen the latest spec yet"
elseif s.phase == "Paused" then
  hs.status, hs.message = "Suspended", message
elseif (stalled ~= nil and stalled.status == "True") or s.phase == "Failed" or s.phase == "RollingBack" then
  hs.status, hs.message = "Degraded", message
elseif ready ~= nil and ready.status == "True" then
  hs.status, hs.message = "Healthy", message
else
  hs.status, hs.message = "Progressing", message
end
return hs
