-- :checkhealth codevista
local M = {}

function M.check()
  local health = vim.health
  health.start("codevista")
  if vim.fn.has("nvim-0.10") == 1 then
    health.ok("Neovim " .. tostring(vim.version()))
  else
    health.error("Neovim 0.10 or newer is needed")
  end
  if vim.lsp.inline_completion ~= nil then -- Neovim 0.12+
    health.info("native vim.lsp.inline_completion is available; codevista draws its own "
      .. "ghost text anyway, because only it shows the server's streamed partial results")
  else
    health.info("no native vim.lsp.inline_completion (Neovim < 0.12): codevista draws ghost "
      .. "text with extmarks")
  end
  local cv = require("codevista")
  if not cv.config then
    health.warn("require('codevista').setup() has not been called")
    return
  end
  local exe = cv.config.cmd[1]
  if vim.fn.executable(exe) == 1 then
    health.ok("server command: " .. table.concat(cv.config.cmd, " ") .. " (" .. vim.fn.exepath(exe) .. ")")
  else
    health.error("server command not found: " .. exe, { "pip install codevista, or set cmd in setup()" })
  end
  local clients = vim.lsp.get_clients({ name = "codevista" })
  if #clients == 0 then
    health.info("the server is not running (it starts with the first supported buffer)")
  else
    health.ok("server running (client id " .. clients[1].id .. ")")
  end
  local st = cv.status
  if st.state == "ready" then
    health.ok("model ready: " .. (st.model or "?"))
  elseif st.state == "error" then
    health.error("model error: " .. (st.message or "?"))
  else
    health.info("model state: " .. (st.state or "?") .. " " .. (st.message or ""))
  end
  health.info("log: " .. vim.lsp.get_log_path())
end

return M
